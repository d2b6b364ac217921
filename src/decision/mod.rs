//! The refresh decision: a pure function of (family state, presented
//! generation, request, policy, now) to a [`Plan`] of what should happen
//! (`plan.rs`). Tables, keys, clocks and delivering events are the engine's
//! business; `reference.rs` checks the decision against plain rules.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::clock::Timestamp;
use crate::dpop::{self, Binding, Jkt};
use crate::family::{Family, Grant, SubjectName};
use crate::policy::{ClientPolicy, IpCheck, PolicyVersion, Rotation};
use crate::token::{FamilyId, FamilySecret, Generation, Token};

mod plan;
#[cfg(test)]
mod reference;

pub(crate) use plan::{Bind, Cascade, Change, Plan, Signal, apply};

/// Why a redemption was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DenyReason {
    /// Malformed, unknown family, unknown key or bad tag. Changes nothing.
    InvalidToken,
    /// The presenting client is not the family's client (RFC 6749 §10.4).
    ClientMismatch,
    /// The family was revoked.
    Revoked,
    /// The family's absolute lifetime has passed.
    ExpiredAbsolute,
    /// The family was unused for longer than the idle TTL.
    ExpiredIdle,
    /// An already-rotated token was presented outside grace (RFC 9700
    /// §4.14.2); the policy's `on_reuse` was applied.
    ReuseDetected,
    /// A generation newer than the family's current one: the state was
    /// rolled back (restored backup, lost write).
    StateRollback,
    /// The client IP is outside the policy's allow-list.
    IpNotAllowed,
    /// The family has rotated 2^32 - 1 times and can rotate no further.
    GenerationsExhausted,
    /// The authorization code was already exchanged, and this replay passed
    /// the exchange's checks within the code's lifetime: its family is
    /// revoked (RFC 6749 §4.1.2).
    CodeReused,
    /// The authorization code was already exchanged, and this replay would
    /// not have passed the exchange's checks within the code's lifetime:
    /// denied, nothing revoked, so a leaked old code logs no one out.
    CodeSpent,
    /// The authorization code's lifetime (`code_ttl`) has passed.
    CodeExpired,
    /// `redirect_uri` differs from the one given at authorization
    /// (RFC 6749 §4.1.3).
    RedirectUriMismatch,
    /// The policy requires PKCE and the challenge or verifier is missing.
    PkceRequired,
    /// The PKCE method is not allowed by the policy (or unknown).
    PkceMethodNotAllowed,
    /// The code challenge is malformed.
    PkceChallengeInvalid,
    /// The code verifier is not 43–128 characters of `[A-Za-z0-9-._~]`.
    PkceVerifierInvalid,
    /// A verifier was sent for a code issued without a challenge: a PKCE
    /// downgrade (RFC 9700 §2.1.1).
    PkceVerifierUnexpected,
    /// The verifier does not match the challenge.
    PkceMismatch,
    /// The set has `unknown_clients = "refuse"` and does not list the
    /// presenting client. Nothing was read or changed.
    UnknownClient,
    /// No DPoP proof came with a token bound to a DPoP key, or under
    /// `dpop = "required"` (RFC 9449 §5). Nothing is revoked.
    DpopProofRequired,
    /// The DPoP proof is from another key than the one the token (or the
    /// code's `dpop_jkt`) is bound to (RFC 9449 §5, §10). Nothing is
    /// revoked: the holder of a stolen token without the key cannot log
    /// the owner out.
    DpopKeyMismatch,
}

/// An OAuth error code (RFC 6749 §5.2): those a denial is reported as, and
/// those a token endpoint built on the engine answers with besides. One
/// type for the engine and the server, so a code is never misspelt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OAuthError {
    /// `invalid_grant`.
    InvalidGrant,
    /// `invalid_client`.
    InvalidClient,
    /// `invalid_request`.
    InvalidRequest,
    /// `invalid_scope` (RFC 6749 §5.2): a refresh asked for more than was
    /// granted (§6).
    InvalidScope,
    /// `unsupported_grant_type` (RFC 6749 §5.2).
    UnsupportedGrantType,
    /// `server_error`: the server could not answer (RFC 6749 §4.1.2.1
    /// defines it; token endpoints use it for the same purpose).
    ServerError,
    /// `invalid_dpop_proof` (RFC 9449 §5, §12.2): the DPoP proof sent
    /// with a token request failed a check of RFC 9449 §4.3.
    InvalidDpopProof,
    /// `use_dpop_nonce` (RFC 9449 §8, §12.2): the proof must carry the
    /// server nonce sent in the `DPoP-Nonce` header of this answer.
    UseDpopNonce,
    /// `temporarily_unavailable` (RFC 6749 §4.1.2.1, used at the token
    /// endpoint too): a store the decision needs did not answer; the
    /// request changed nothing and may be retried (with `Retry-After`,
    /// RFC 9110 §10.2.3).
    TemporarilyUnavailable,
}

impl OAuthError {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthError::InvalidGrant => "invalid_grant",
            OAuthError::InvalidClient => "invalid_client",
            OAuthError::InvalidRequest => "invalid_request",
            OAuthError::InvalidScope => "invalid_scope",
            OAuthError::UnsupportedGrantType => "unsupported_grant_type",
            OAuthError::ServerError => "server_error",
            OAuthError::InvalidDpopProof => "invalid_dpop_proof",
            OAuthError::UseDpopNonce => "use_dpop_nonce",
            OAuthError::TemporarilyUnavailable => "temporarily_unavailable",
        }
    }
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DenyReason {
    /// Stable snake_case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::InvalidToken => "invalid_token",
            DenyReason::ClientMismatch => "client_mismatch",
            DenyReason::Revoked => "revoked",
            DenyReason::ExpiredAbsolute => "expired_absolute",
            DenyReason::ExpiredIdle => "expired_idle",
            DenyReason::ReuseDetected => "reuse_detected",
            DenyReason::StateRollback => "state_rollback",
            DenyReason::IpNotAllowed => "ip_not_allowed",
            DenyReason::GenerationsExhausted => "generations_exhausted",
            DenyReason::CodeReused => "code_reused",
            DenyReason::CodeSpent => "code_spent",
            DenyReason::CodeExpired => "code_expired",
            DenyReason::RedirectUriMismatch => "redirect_uri_mismatch",
            DenyReason::PkceRequired => "pkce_required",
            DenyReason::PkceMethodNotAllowed => "pkce_method_not_allowed",
            DenyReason::PkceChallengeInvalid => "pkce_challenge_invalid",
            DenyReason::PkceVerifierInvalid => "pkce_verifier_invalid",
            DenyReason::PkceVerifierUnexpected => "pkce_verifier_unexpected",
            DenyReason::PkceMismatch => "pkce_mismatch",
            DenyReason::UnknownClient => "unknown_client",
            DenyReason::DpopProofRequired => "dpop_proof_required",
            DenyReason::DpopKeyMismatch => "dpop_key_mismatch",
        }
    }

    /// The OAuth error to answer with. A refresh token "issued to another
    /// client" is `invalid_grant` per RFC 6749 §5.2; `invalid_client` is for
    /// failed client authentication, which is the server's, not the engine's,
    /// save the one case RFC 6749 §5.2 names that the engine decides: an
    /// unknown client (`unknown_clients = "refuse"`).
    /// A malformed PKCE challenge is a bad authorization request. The DPoP
    /// denials are `invalid_grant`: the proof itself was valid (a bad one
    /// is the server's `invalid_dpop_proof`, RFC 9449 §5), the grant is
    /// bound to another key or needs one.
    pub fn oauth_error(self) -> OAuthError {
        match self {
            DenyReason::PkceChallengeInvalid => OAuthError::InvalidRequest,
            DenyReason::UnknownClient => OAuthError::InvalidClient,
            _ => OAuthError::InvalidGrant,
        }
    }

    /// Text safe to show the client: names the failed check, echoes nothing.
    pub fn description(self) -> &'static str {
        match self {
            DenyReason::InvalidToken => "refresh token is invalid",
            DenyReason::ClientMismatch => "refresh token was issued to another client",
            DenyReason::Revoked => "refresh token has been revoked",
            DenyReason::ExpiredAbsolute => "refresh token has passed its absolute lifetime",
            DenyReason::ExpiredIdle => "refresh token expired after being unused too long",
            DenyReason::ReuseDetected => "refresh token reuse detected; token family revoked",
            DenyReason::StateRollback => "refresh token is newer than the server's state",
            DenyReason::IpNotAllowed => "refresh is not allowed from this network",
            DenyReason::GenerationsExhausted => "refresh token can no longer be rotated",
            DenyReason::CodeReused => {
                "authorization code was already used; tokens issued from it are revoked"
            }
            DenyReason::CodeSpent => "authorization code was already used",
            DenyReason::CodeExpired => "authorization code has expired",
            DenyReason::RedirectUriMismatch => {
                "redirect_uri does not match the authorization request"
            }
            DenyReason::PkceRequired => "PKCE is required: code_challenge or code_verifier missing",
            DenyReason::PkceMethodNotAllowed => "code_challenge_method is not allowed; use S256",
            DenyReason::PkceChallengeInvalid => "code_challenge is malformed",
            DenyReason::PkceVerifierInvalid => {
                "code_verifier must be 43-128 characters of [A-Za-z0-9-._~]"
            }
            DenyReason::PkceVerifierUnexpected => {
                "code_verifier sent for an authorization request without code_challenge"
            }
            DenyReason::PkceMismatch => "code_verifier does not match code_challenge",
            DenyReason::UnknownClient => "client is not registered with this server",
            DenyReason::DpopProofRequired => "a DPoP proof is required for this grant",
            DenyReason::DpopKeyMismatch => {
                "the DPoP proof is not from the key this grant is bound to"
            }
        }
    }

    /// Every reason, for metrics tables.
    pub const ALL: [DenyReason; 22] = [
        DenyReason::InvalidToken,
        DenyReason::ClientMismatch,
        DenyReason::Revoked,
        DenyReason::ExpiredAbsolute,
        DenyReason::ExpiredIdle,
        DenyReason::ReuseDetected,
        DenyReason::StateRollback,
        DenyReason::IpNotAllowed,
        DenyReason::GenerationsExhausted,
        DenyReason::CodeReused,
        DenyReason::CodeSpent,
        DenyReason::CodeExpired,
        DenyReason::RedirectUriMismatch,
        DenyReason::PkceRequired,
        DenyReason::PkceMethodNotAllowed,
        DenyReason::PkceChallengeInvalid,
        DenyReason::PkceVerifierInvalid,
        DenyReason::PkceVerifierUnexpected,
        DenyReason::PkceMismatch,
        DenyReason::UnknownClient,
        DenyReason::DpopProofRequired,
        DenyReason::DpopKeyMismatch,
    ];
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an accepted redemption was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AcceptKind {
    /// The family advanced one generation; the token is new.
    Rotated,
    /// Policy `rotation = "reuse"`: the presented token stays valid.
    Kept,
    /// The predecessor was replayed inside the grace window: the token is the
    /// successor the rotation already returned.
    GraceReplay,
    /// A new family was started.
    Issued,
    /// An authorization code was issued (generation 0).
    CodeIssued,
    /// An authorization code was exchanged for the first refresh token.
    Exchanged,
}

impl AcceptKind {
    /// Stable snake_case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AcceptKind::Rotated => "rotated",
            AcceptKind::Kept => "kept",
            AcceptKind::GraceReplay => "grace_replay",
            AcceptKind::Issued => "issued",
            AcceptKind::CodeIssued => "code_issued",
            AcceptKind::Exchanged => "exchanged",
        }
    }
}

/// An accepted redemption, with what a token response needs: the
/// family's subject, scope and client ([`subject`](Self::subject),
/// [`scope`](Self::scope), [`client`](Self::client)), taken under the same
/// lock as the decision, so a revocation or sweep racing the response
/// cannot take them away. Handing them out allocates nothing: the family's
/// shared grant and subject are reference-counted (short subjects are
/// copied inline).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The refresh token the client must use next.
    pub token: Token,
    /// Its family.
    pub family: FamilyId,
    /// Its generation.
    pub generation: Generation,
    /// Rotation, reuse or grace replay.
    pub kind: AcceptKind,
    /// The policy set that decided.
    pub policy_version: PolicyVersion,
    /// The family's client and scope: its grant, whose count is shared
    /// only with the families of its stripe (see `Interner`).
    pub(crate) grant: Arc<Grant>,
    /// The family's subject.
    pub(crate) subject: SubjectName,
    /// The family's secret, so that an access token can be minted for the
    /// acceptance without a second lookup a revocation or sweep could race
    /// (see `Engine::access_token`). Never shown: `Debug` redacts it.
    pub(crate) secret: FamilySecret,
}

impl Accepted {
    /// What an acceptance carries of the family `grant` and `subject` name:
    /// counted references, no copies (a move of a large `Decision` costs
    /// more than the count; BENCHMARKS.md "This phase: before and after").
    // Each argument is one field the three acceptance sites (issue,
    // exchange, redeem) copy out of the record under its lock; a struct to
    // carry them would be this function again.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn of(
        token: Token,
        family: FamilyId,
        generation: Generation,
        kind: AcceptKind,
        policy_version: PolicyVersion,
        grant: &Arc<Grant>,
        subject: &SubjectName,
        secret: FamilySecret,
    ) -> Accepted {
        Accepted {
            token,
            family,
            generation,
            kind,
            policy_version,
            grant: grant.clone(),
            subject: subject.clone(),
            secret,
        }
    }

    /// The end user (`sub`) the family belongs to.
    pub fn subject(&self) -> &str {
        self.subject.as_str()
    }

    /// The scope granted to the family, space-separated.
    pub fn scope(&self) -> &str {
        &self.grant.scope
    }

    /// The client the family is bound to.
    pub fn client(&self) -> &str {
        &self.grant.client
    }

    /// The DPoP key (RFC 7638 thumbprint) the family's tokens are bound
    /// to, if any: an opaque access token minted for this acceptance is
    /// bound to the same key through its family (RFC 9449 §6).
    pub fn jkt(&self) -> Option<&Jkt> {
        self.grant.jkt.as_ref()
    }
}

/// A refused redemption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied {
    /// What failed.
    pub reason: DenyReason,
    /// The family, when the token named a real one with a valid tag.
    pub family: Option<FamilyId>,
    /// The policy set that decided.
    pub policy_version: PolicyVersion,
}

/// The outcome of one redemption: always a decision, never an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Accepted, with the token to use next.
    Accept(Accepted),
    /// Refused, with why.
    Deny(Denied),
}

impl Decision {
    /// The accepted outcome, if it was one.
    pub fn accepted(&self) -> Option<&Accepted> {
        match self {
            Decision::Accept(a) => Some(a),
            Decision::Deny(_) => None,
        }
    }

    /// The denial reason, if it was one.
    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            Decision::Accept(_) => None,
            Decision::Deny(d) => Some(d.reason),
        }
    }

    /// The policy set that decided.
    pub fn policy_version(&self) -> PolicyVersion {
        match self {
            Decision::Accept(a) => a.policy_version,
            Decision::Deny(d) => d.policy_version,
        }
    }

    /// The outcome's snake_case name (`rotated`, `reuse_detected`, ...).
    pub fn outcome(&self) -> &'static str {
        match self {
            Decision::Accept(a) => a.kind.as_str(),
            Decision::Deny(d) => d.reason.as_str(),
        }
    }
}

/// What the request brings, beyond the token's verified fields.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Request<'a> {
    pub(crate) generation: Generation,
    pub(crate) client: &'a str,
    /// `None` when the caller's address could not be determined (an
    /// unreadable forwarding chain): outside every non-empty allow-list.
    pub(crate) ip: Option<IpAddr>,
    /// The thumbprint of the key of the verified DPoP proof sent with the
    /// request, if one was.
    pub(crate) jkt: Option<&'a Jkt>,
    pub(crate) now: Timestamp,
}

/// Accept how, or deny why: the outcome part of a [`Plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept(AcceptKind),
    Deny(DenyReason),
}

/// Steps 4–9 of the README's "The order of checks", in order, and what
/// each outcome sets off: the family's change, the revocations, the events.
/// Steps 1–3 (parse, look up, verify the tag) need the key ring and the
/// table, so the engine does them first; a family only reaches this
/// function with a valid tag.
pub(crate) fn decide(f: &Family, req: &Request<'_>, policy: &ClientPolicy) -> Plan {
    // 4. Client binding.
    if **f.client() != *req.client {
        return Plan::deny(DenyReason::ClientMismatch).emitting(Signal::ClientMismatch);
    }
    // 5. Revoked, then absolute, then idle lifetime.
    if !f.is_active() {
        return Plan::deny(DenyReason::Revoked);
    }
    if let Some(reason) = expiry(f, policy, req.now) {
        return Plan::deny(reason);
    }
    // 6. Sender constraint (RFC 9449 §5), before the generation is looked
    //    at: without the key, neither a grace replay nor a revocation.
    //    Under `required`, a live unbound family of a public client binds
    //    to the key of its first accepted proof.
    let bind = match dpop::check(f.jkt(), req.jkt, policy.dpop, policy.is_public()) {
        Ok(Binding::Bind(_)) => Bind::Presented,
        Ok(Binding::Bound | Binding::Unbound) => Bind::Keep,
        Err(reason) => return Plan::deny(reason).emitting(Signal::of_dpop(reason)),
    };
    // 7. Classify the presented generation against the current one.
    let (g, c) = (req.generation, f.generation);
    if g > c {
        let rollback = Signal::StateRollback {
            presented: g,
            current: c,
        };
        return Plan::deny(DenyReason::StateRollback).emitting(rollback);
    }
    if g < c {
        if !in_grace(f, req, policy) {
            let reuse = Signal::ReuseDetected {
                presented: g,
                current: c,
                response: policy.on_reuse,
            };
            return Plan::deny(DenyReason::ReuseDetected)
                .emitting(reuse)
                .cascading(Cascade::of_reuse(policy.on_reuse));
        }
        // A grace replay hands out the successor: it is a redemption, and
        // every check that guards one guards it, the allow-list included.
        // Outside the list it is denied like the current token would be,
        // without revocation (the grace window says this is no theft).
        if !ip_admitted(req, policy) {
            return Plan::deny(DenyReason::IpNotAllowed).emitting(Signal::IpNotAllowed);
        }
        return Plan::accept(AcceptKind::GraceReplay, Change::GraceReplay).binding(bind);
    }
    // 8. Allow-list, after reuse: a replay from a foreign network is theft,
    //    not travel. No revocation: the owner may be travelling.
    if !ip_admitted(req, policy) {
        return Plan::deny(DenyReason::IpNotAllowed).emitting(Signal::IpNotAllowed);
    }
    // 9. Accept.
    match policy.rotation {
        Rotation::Reuse => Plan::accept(AcceptKind::Kept, Change::Keep).binding(bind),
        Rotation::Rotate if c.next().is_none() => Plan::deny(DenyReason::GenerationsExhausted),
        Rotation::Rotate => Plan::accept(AcceptKind::Rotated, Change::Rotate).binding(bind),
    }
}

/// Whether the family's lifetime is over under `policy` at `now`.
pub(crate) fn expiry(f: &Family, policy: &ClientPolicy, now: Timestamp) -> Option<DenyReason> {
    if let Some(ttl) = policy.absolute_ttl
        && now >= f.created.saturating_add(ttl)
    {
        return Some(DenyReason::ExpiredAbsolute);
    }
    if let Some(ttl) = policy.idle_ttl
        && now >= f.last_used.saturating_add(ttl)
    {
        return Some(DenyReason::ExpiredIdle);
    }
    None
}

/// The refresh-time allow-list check (`ip_check = every_refresh`).
fn ip_admitted(req: &Request<'_>, policy: &ClientPolicy) -> bool {
    policy.ip_check != IpCheck::EveryRefresh || policy.ip_allowlist.admits(req.ip)
}

fn in_grace(f: &Family, req: &Request<'_>, policy: &ClientPolicy) -> bool {
    // `now` is read before the shard lock, so a racing loser's clock can
    // precede the winner's `rotated_at`; time never runs backwards past the
    // rotation, so a zero grace period grants no replay, ever.
    let now = req.now.max(f.rotated_at);
    // Only the immediate predecessor, and only once a rotation happened
    // (generation 1 has no predecessor refresh token).
    Some(req.generation) == f.generation.get().checked_sub(1).map(Generation::new)
        && req.generation >= Generation::FIRST
        && now < f.rotated_at.saturating_add(policy.grace_period)
        && f.grace_used < policy.grace_max_replays
        // IPv4-mapped IPv6 is the same client as plain IPv4 (as in the
        // allow-list): one proxy may log either spelling. An unknown address
        // is never the rotation's.
        && (!policy.grace_same_ip
            || (req.ip.is_some()
                && f.rotation_ip.map(|a| a.to_canonical())
                    == req.ip.map(|a| a.to_canonical())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Display` is the stable snake_case name that logs and metrics key
    /// on. (A mutant printing nothing passed every test.)
    #[test]
    fn deny_reasons_display_as_their_stable_names() {
        for r in DenyReason::ALL {
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(DenyReason::ReuseDetected.to_string(), "reuse_detected");
    }

    /// The OAuth error codes are RFC 6749's spellings, and `Display` is the
    /// code: the server answers with them (it has no strings of its own).
    #[test]
    fn oauth_errors_display_as_their_wire_codes() {
        for (e, code) in [
            (OAuthError::InvalidGrant, "invalid_grant"),
            (OAuthError::InvalidClient, "invalid_client"),
            (OAuthError::InvalidRequest, "invalid_request"),
            (OAuthError::InvalidScope, "invalid_scope"),
            (OAuthError::UnsupportedGrantType, "unsupported_grant_type"),
            (OAuthError::ServerError, "server_error"),
        ] {
            assert_eq!(e.as_str(), code);
            assert_eq!(e.to_string(), code);
        }
    }
    use crate::family::RevokeReason;
    use crate::policy::{AllowList, IpRange};
    use crate::token::KeyId;
    use std::time::Duration;

    fn fam(gen_: u32) -> Family {
        Family {
            generation: Generation::new(gen_),
            rotation_ip: Some("10.0.0.1".parse().unwrap()),
            ..Family::for_test(FamilyId::from_bytes([1; 16]))
        }
    }

    fn req(g: u32, secs: u64) -> Request<'static> {
        Request {
            generation: Generation::new(g),
            client: "c",
            ip: Some("10.0.0.1".parse().unwrap()),
            jkt: None,
            now: Timestamp::from_secs(secs),
        }
    }

    /// The verdict of the plan; the plans' other parts are checked
    /// against the reference in `reference.rs`.
    fn decide(f: &Family, r: &Request<'_>, p: &ClientPolicy) -> Verdict {
        super::decide(f, r, p).verdict
    }

    fn deny(v: Verdict) -> DenyReason {
        match v {
            Verdict::Deny(r) => r,
            Verdict::Accept(k) => panic!("accepted as {k:?}"),
        }
    }

    #[test]
    fn client_binding_comes_before_revocation_and_expiry() {
        let mut f = fam(3);
        f.revoke(RevokeReason::Requested, Timestamp::from_secs(1000));
        let mut r = req(3, 1_000_000_000);
        r.client = "other";
        assert_eq!(
            deny(decide(&f, &r, &ClientPolicy::default())),
            DenyReason::ClientMismatch
        );
    }

    #[test]
    fn revoked_before_expired_and_absolute_before_idle() {
        let p = ClientPolicy::default();
        let mut f = fam(3);
        let late = 1000 + 91 * 86400;
        assert_eq!(
            deny(decide(&f, &req(3, late), &p)),
            DenyReason::ExpiredAbsolute
        );
        f.revoke(RevokeReason::Requested, Timestamp::from_secs(1000));
        assert_eq!(deny(decide(&f, &req(3, late), &p)), DenyReason::Revoked);
    }

    #[test]
    fn expiry_denies_before_any_generation_logic() {
        let p = ClientPolicy::default();
        let f = fam(3);
        let idle = 1000 + 31 * 86400;
        assert_eq!(deny(decide(&f, &req(1, idle), &p)), DenyReason::ExpiredIdle);
        assert_eq!(deny(decide(&f, &req(9, idle), &p)), DenyReason::ExpiredIdle);
    }

    #[test]
    fn reuse_is_checked_before_allow_list() {
        let p = ClientPolicy {
            ip_allowlist: AllowList::new(&["192.0.2.0/24".parse::<IpRange>().unwrap()]),
            ..ClientPolicy::default()
        };
        let f = fam(3);
        assert_eq!(
            deny(decide(&f, &req(1, 1001), &p)),
            DenyReason::ReuseDetected
        );
        assert_eq!(
            deny(decide(&f, &req(3, 1001), &p)),
            DenyReason::IpNotAllowed
        );
    }

    #[test]
    fn issuance_only_skips_the_allow_list_on_refresh() {
        let p = ClientPolicy {
            ip_allowlist: AllowList::new(&["192.0.2.0/24".parse::<IpRange>().unwrap()]),
            ip_check: IpCheck::IssuanceOnly,
            ..ClientPolicy::default()
        };
        assert_eq!(
            decide(&fam(3), &req(3, 1001), &p),
            Verdict::Accept(AcceptKind::Rotated)
        );
    }

    #[test]
    fn grace_window_bounds() {
        let p = ClientPolicy {
            grace_period: Duration::from_secs(10),
            grace_max_replays: 2,
            ..ClientPolicy::default()
        };
        let mut f = fam(3);
        let grace = Verdict::Accept(AcceptKind::GraceReplay);
        assert_eq!(decide(&f, &req(2, 1009), &p), grace);
        assert_eq!(
            deny(decide(&f, &req(2, 1010), &p)),
            DenyReason::ReuseDetected
        );
        assert_eq!(
            deny(decide(&f, &req(1, 1001), &p)),
            DenyReason::ReuseDetected
        );
        f.grace_used = 2;
        assert_eq!(
            deny(decide(&f, &req(2, 1001), &p)),
            DenyReason::ReuseDetected
        );
    }

    #[test]
    fn grace_same_ip_refuses_other_ip() {
        let p = ClientPolicy {
            grace_period: Duration::from_secs(10),
            grace_same_ip: true,
            ..ClientPolicy::default()
        };
        let f = fam(3);
        let mut r = req(2, 1001);
        assert_eq!(decide(&f, &r, &p), Verdict::Accept(AcceptKind::GraceReplay));
        r.ip = Some("10.0.0.2".parse().unwrap());
        assert_eq!(deny(decide(&f, &r, &p)), DenyReason::ReuseDetected);
    }

    /// Regression: `grace_same_ip` compared IP spellings, so a retry from
    /// `::ffff:10.0.0.1` after a rotation from `10.0.0.1` was revoked as reuse
    /// (found by the model test).
    #[test]
    fn grace_same_ip_treats_ipv4_mapped_as_the_same_ip() {
        let p = ClientPolicy {
            grace_period: Duration::from_secs(10),
            grace_same_ip: true,
            ..ClientPolicy::default()
        };
        let f = fam(3);
        let mut r = req(2, 1001);
        r.ip = Some("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(decide(&f, &r, &p), Verdict::Accept(AcceptKind::GraceReplay));
        let mut g = fam(3);
        g.rotation_ip = Some("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(
            decide(&g, &req(2, 1001), &p),
            Verdict::Accept(AcceptKind::GraceReplay)
        );
    }

    /// Regression: the grace branch answered before the allow-list, so a
    /// spent token replayed from outside the client's networks got the
    /// successor. A grace replay is a redemption: outside the list it is
    /// `ip_not_allowed` (no revocation), like the current token would be.
    #[test]
    fn a_grace_replay_from_outside_the_allow_list_is_ip_not_allowed() {
        let p = ClientPolicy {
            grace_period: Duration::from_secs(10),
            ip_allowlist: AllowList::new(&["10.0.0.0/8".parse::<IpRange>().unwrap()]),
            ..ClientPolicy::default()
        };
        let f = fam(3);
        let mut r = req(2, 1001);
        assert_eq!(decide(&f, &r, &p), Verdict::Accept(AcceptKind::GraceReplay));
        r.ip = Some("192.0.2.7".parse().unwrap());
        assert_eq!(deny(decide(&f, &r, &p)), DenyReason::IpNotAllowed);
        r.ip = None;
        assert_eq!(deny(decide(&f, &r, &p)), DenyReason::IpNotAllowed);
        // Outside the window it is still theft first: reuse before the list.
        r.now = Timestamp::from_secs(1010);
        assert_eq!(deny(decide(&f, &r, &p)), DenyReason::ReuseDetected);
        // `issuance_only` does not check refreshes, replays included.
        let issuance_only = ClientPolicy {
            ip_check: IpCheck::IssuanceOnly,
            ..p
        };
        r.now = Timestamp::from_secs(1001);
        assert_eq!(
            decide(&f, &r, &issuance_only),
            Verdict::Accept(AcceptKind::GraceReplay)
        );
    }

    /// An address that could not be determined is outside every non-empty
    /// allow-list, and inside the empty one (any).
    #[test]
    fn an_unknown_address_fails_a_non_empty_allow_list_only() {
        let mut r = req(3, 1001);
        r.ip = None;
        assert_eq!(
            decide(&fam(3), &r, &ClientPolicy::default()),
            Verdict::Accept(AcceptKind::Rotated)
        );
        let p = ClientPolicy {
            ip_allowlist: AllowList::new(&["0.0.0.0/0".parse::<IpRange>().unwrap()]),
            ..ClientPolicy::default()
        };
        assert_eq!(deny(decide(&fam(3), &r, &p)), DenyReason::IpNotAllowed);
    }

    /// Regression: `now` is read before the shard lock, so a racing loser's
    /// `now` could precede the winner's `rotated_at`, and `grace_period = 0s`
    /// still granted it a replay. Zero grace means no replay, ever.
    #[test]
    fn zero_grace_never_replays_even_when_now_precedes_the_rotation() {
        let zero = ClientPolicy::default();
        assert_eq!(zero.grace_period, Duration::ZERO);
        let f = fam(3); // rotated at 1000
        assert_eq!(
            deny(decide(&f, &req(2, 999), &zero)),
            DenyReason::ReuseDetected
        );
        // With a window, an early `now` counts from the rotation.
        let ten = ClientPolicy {
            grace_period: Duration::from_secs(10),
            ..ClientPolicy::default()
        };
        assert_eq!(
            decide(&f, &req(2, 999), &ten),
            Verdict::Accept(AcceptKind::GraceReplay)
        );
    }

    /// The rotation records who rotated (for `grace_same_ip`), and an
    /// early `now` never moves rotation or last use backwards.
    #[test]
    fn apply_rotation_records_the_rotation_ip_and_keeps_time_monotonic() {
        let mut f = fam(3);
        let mut r = req(3, 999);
        r.ip = Some("::ffff:192.0.2.1".parse().unwrap());
        apply(&mut f, Change::Rotate, r.now, r.ip, KeyId(0));
        assert_eq!(f.rotation_ip, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(f.rotated_at, Timestamp::from_secs(1000));
        assert_eq!(f.last_used, Timestamp::from_secs(1000));
        r.ip = None;
        r.now = Timestamp::from_secs(2000);
        r.generation = Generation::new(4);
        apply(&mut f, Change::Rotate, r.now, r.ip, KeyId(0));
        assert_eq!(f.rotation_ip, None, "an unknown address is not kept");
        let same_ip = ClientPolicy {
            grace_period: Duration::from_secs(10),
            grace_same_ip: true,
            ..ClientPolicy::default()
        };
        let mut replay = req(4, 2001);
        replay.ip = None;
        assert_eq!(
            deny(decide(&f, &replay, &same_ip)),
            DenyReason::ReuseDetected,
            "an unknown address never matches the rotation's"
        );
    }

    #[test]
    fn newer_generation_is_rollback() {
        assert_eq!(
            deny(decide(&fam(3), &req(4, 1001), &ClientPolicy::default())),
            DenyReason::StateRollback
        );
    }

    #[test]
    fn exhausted_generations_deny_instead_of_wrapping() {
        let f = fam(u32::MAX);
        assert_eq!(
            deny(decide(&f, &req(u32::MAX, 1001), &ClientPolicy::default())),
            DenyReason::GenerationsExhausted
        );
    }

    #[test]
    fn apply_rotation_resets_grace_state() {
        let mut f = fam(3);
        f.grace_used = 1;
        let r = req(3, 2000);
        apply(&mut f, Change::Rotate, r.now, r.ip, KeyId(5));
        assert_eq!(f.generation, Generation::new(4));
        assert_eq!(f.grace_used, 0);
        assert_eq!(f.rotated_at, r.now);
        assert_eq!(f.last_used, r.now);
        assert_eq!(f.key, KeyId(5));
        assert_eq!(
            f.tag_uid,
            crate::token::KeyUid::NONE,
            "tag cache invalidated"
        );
    }
}
