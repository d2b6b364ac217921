//! Authorization codes bound to PKCE (RFC 7636): generation 0 of a family.
//!
//! A code is derived and verified like a refresh token (its own prefix and
//! MAC domain). What the exchange checks it against (its issue time, a
//! digest of the redirect URI, the challenge) lives in the family record
//! from authorization until the code's lifetime ends, past the exchange: a
//! replay of an exchanged code revokes the family born from it (RFC 6749
//! §4.1.2) only when the replay passes the exchange's own checks within
//! that lifetime, so that an old code leaked through a URL, a Referer or a
//! log cannot log anyone out (README "Authorization codes"). The checks
//! here are pure; the engine applies them under the family's lock, so one
//! exchange wins and a replay is seen as one.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::Timestamp;
use crate::decision::{AcceptKind, Bind, Cascade, Change, DenyReason, Plan, Signal};
use crate::dpop::{self, Jkt};
use crate::family::{Family, RevokeReason};
use crate::policy::{ClientPolicy, MAX_CODE_TTL, Pkce};
use crate::token::Generation;

/// Longest redirect URI accepted.
pub const MAX_REDIRECT_URI_LEN: usize = 2048;

/// The challenge a code was issued with. Both forms hold a SHA-256 digest,
/// so the record never holds a verifier and its size does not depend on
/// the request.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// SHA-256 of the verifier (RFC 7636 `S256`): the challenge itself.
    S256([u8; 32]),
    /// SHA-256 of a `plain` challenge, which is the verifier itself.
    Plain([u8; 32]),
}

impl fmt::Debug for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A plain challenge's digest is the S256 challenge of the verifier:
        // print neither.
        match self {
            Challenge::S256(_) => f.write_str("S256(..)"),
            Challenge::Plain(_) => f.write_str("Plain(..)"),
        }
    }
}

/// What the exchange checks a code against; kept past the exchange until
/// [`CodeState::outlived`], so that a replay can be held to the same
/// checks. A fixed 80 bytes (`size_of`, tested), behind a pointer in the
/// record: a family that was never a code holds none.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct CodeState {
    /// When the code was issued: its lifetime (`code_ttl`) counts from here,
    /// also after the exchange has reset the family's `created`.
    pub(crate) issued: Timestamp,
    /// SHA-256 of the redirect URI of the authorization request.
    pub(crate) redirect_uri: [u8; 32],
    pub(crate) challenge: Option<Challenge>,
}

impl CodeState {
    pub(crate) fn new(
        issued: Timestamp,
        redirect_uri: &str,
        challenge: Option<Challenge>,
    ) -> CodeState {
        CodeState {
            issued,
            redirect_uri: sha256(redirect_uri),
            challenge,
        }
    }

    /// Whether the code's lifetime is over under `policy`.
    pub(crate) fn expired(&self, policy: &ClientPolicy, now: Timestamp) -> bool {
        now >= self.issued.saturating_add(policy.code_ttl)
    }

    /// Whether no exchange or replay can pass any more, whatever policy is
    /// swapped in: no `code_ttl` exceeds [`MAX_CODE_TTL`]. From then on the
    /// state decides nothing and can be dropped.
    pub(crate) fn outlived(&self, now: Timestamp) -> bool {
        now >= self.issued.saturating_add(MAX_CODE_TTL)
    }
}

impl fmt::Debug for CodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = match &self.challenge {
            Some(Challenge::S256(_)) => "S256",
            Some(Challenge::Plain(_)) => "plain",
            None => "none",
        };
        f.debug_struct("CodeState")
            .field("issued", &self.issued)
            .field("challenge_method", &method)
            .finish_non_exhaustive()
    }
}

/// Whether `f` holds code state that can no longer decide anything: the
/// family is revoked (every exchange and replay is then `revoked`), or its
/// code was exchanged and has [outlived](CodeState::outlived) any lifetime.
pub(crate) fn state_retired(f: &Family, now: Timestamp) -> bool {
    f.code
        .as_deref()
        .is_some_and(|c| !f.is_active() || (f.generation != Generation::CODE && c.outlived(now)))
}

/// RFC 7636 §4.1: 43 to 128 characters of `[A-Za-z0-9-._~]`.
pub(crate) fn is_valid_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// SHA-256 of a string: BASE64URL-decoded `S256` of a verifier (RFC 7636
/// §4.2), and the digests the record keeps.
pub(crate) fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Check an authorize request's PKCE parameters against the policy and turn
/// them into the challenge to store. Refusals are `invalid_request`.
pub(crate) fn challenge_for(
    policy: &ClientPolicy,
    challenge: Option<&str>,
    method: Option<&str>,
) -> Result<Option<Challenge>, DenyReason> {
    let Some(challenge) = challenge else {
        if method.is_some() {
            return Err(DenyReason::PkceChallengeInvalid);
        }
        return match policy.pkce {
            Pkce::Optional => Ok(None),
            Pkce::S256 | Pkce::S256OrPlain => Err(DenyReason::PkceRequired),
        };
    };
    // RFC 7636 §4.3: an absent method means plain.
    match method.unwrap_or("plain") {
        "S256" => {
            let mut raw = [0u8; 33];
            match URL_SAFE_NO_PAD.decode_slice(challenge, &mut raw) {
                Ok(32) if challenge.len() == 43 => {
                    let mut c = [0u8; 32];
                    c.copy_from_slice(&raw[..32]);
                    Ok(Some(Challenge::S256(c)))
                }
                _ => Err(DenyReason::PkceChallengeInvalid),
            }
        }
        "plain" => {
            if policy.pkce == Pkce::S256 {
                return Err(DenyReason::PkceMethodNotAllowed);
            }
            if !is_valid_verifier(challenge) {
                return Err(DenyReason::PkceChallengeInvalid);
            }
            Ok(Some(Challenge::Plain(sha256(challenge))))
        }
        _ => Err(DenyReason::PkceMethodNotAllowed),
    }
}

/// What an exchange presents besides the code.
pub(crate) struct ExchangeCheck<'a> {
    pub(crate) client: &'a str,
    pub(crate) redirect_uri: &'a str,
    pub(crate) verifier: Option<&'a str>,
    pub(crate) ip: Option<std::net::IpAddr>,
    /// The key of the verified DPoP proof sent with the exchange.
    pub(crate) jkt: Option<&'a Jkt>,
    pub(crate) now: Timestamp,
}

/// The exchange decision, in order: client binding, revoked, DPoP key,
/// replay, redirect URI, expiry, PKCE, allow-list.
///
/// The DPoP check is the refresh decision's (README "The order of
/// checks", step 6), against the code's `dpop_jkt` (RFC 9449 §10) or, for
/// a replay, the key the family was bound to since: a replay without that
/// key is denied before it is classified, so it revokes nothing.
///
/// A replay (the family is past generation 0) is `CodeReused`, and revokes
/// the family (RFC 6749 §4.1.2), only if it passes the redirect URI, expiry
/// and PKCE checks an exchange would, under the policy in force now; any
/// other replay is `CodeSpent`, whatever failed, so that the answer does
/// not depend on whether the state was dropped yet and tells a holder of a
/// leaked code nothing about its redirect URI. The allow-list is not one
/// of those checks: as with a rotated-out refresh token (README "The order
/// of checks"), a replay proving the verifier from a foreign network is the
/// strongest sign of theft.
///
/// The plan says what each outcome sets off: an exchange makes the code
/// generation 1; a revoking replay revokes the family with a `code_replay`
/// event saying so, any other replay emits one saying it did not; another
/// client's code and a caller outside the allow-list emit their events.
pub(crate) fn decide_exchange(f: &Family, req: &ExchangeCheck<'_>, policy: &ClientPolicy) -> Plan {
    let reason = match check_exchange(f, req, policy) {
        Ok(()) => {
            // The family's binding for life (RFC 9449 §5): a public
            // client's, to the exchange's proof where its policy allows
            // DPoP; a confidential client's refresh tokens are never bound,
            // also when its code was (`dpop_jkt`).
            let bind = match dpop::at_exchange(req.jkt, policy.dpop, policy.is_public()) {
                Some(_) => Bind::Presented,
                None if f.jkt().is_some() => Bind::Clear,
                None => Bind::Keep,
            };
            return Plan::accept(AcceptKind::Exchanged, Change::Exchange).binding(bind);
        }
        Err(reason) => reason,
    };
    let plan = Plan::deny(reason);
    match reason {
        DenyReason::CodeReused => plan
            .emitting(Signal::CodeReplay { revoked: true })
            .cascading(Cascade::Family(RevokeReason::CodeReplay)),
        DenyReason::CodeSpent => plan.emitting(Signal::CodeReplay { revoked: false }),
        DenyReason::ClientMismatch => plan.emitting(Signal::ClientMismatch),
        DenyReason::IpNotAllowed => plan.emitting(Signal::IpNotAllowed),
        DenyReason::DpopProofRequired | DenyReason::DpopKeyMismatch => {
            plan.emitting(Signal::of_dpop(reason))
        }
        _ => plan,
    }
}

/// The checks of [`decide_exchange`], in its order.
fn check_exchange(
    f: &Family,
    req: &ExchangeCheck<'_>,
    policy: &ClientPolicy,
) -> Result<(), DenyReason> {
    if **f.client() != *req.client {
        return Err(DenyReason::ClientMismatch);
    }
    if !f.is_active() {
        return Err(DenyReason::Revoked);
    }
    dpop::check(f.jkt(), req.jkt, policy.dpop, policy.is_public())?;
    if f.generation != Generation::CODE {
        let proven = f
            .code
            .as_deref()
            .is_some_and(|code| check_code(code, req, policy).is_ok());
        return Err(if proven {
            DenyReason::CodeReused
        } else {
            DenyReason::CodeSpent
        });
    }
    // Every code is issued with its state: a generation-0 record without
    // one (a hand-made restore) has nothing to check a code against.
    let Some(code) = f.code.as_deref() else {
        return Err(DenyReason::InvalidToken);
    };
    check_code(code, req, policy)?;
    // The allow-list applies here in both `ip_check` modes: the exchange is
    // where the family is issued.
    if !policy.ip_allowlist.admits(req.ip) {
        return Err(DenyReason::IpNotAllowed);
    }
    Ok(())
}

/// What both an exchange and a revoking replay must pass: the identical
/// redirect URI (RFC 6749 §4.1.3), the code's lifetime, PKCE.
fn check_code(
    code: &CodeState,
    req: &ExchangeCheck<'_>,
    policy: &ClientPolicy,
) -> Result<(), DenyReason> {
    if !bool::from(code.redirect_uri.ct_eq(&sha256(req.redirect_uri))) {
        return Err(DenyReason::RedirectUriMismatch);
    }
    if code.expired(policy, req.now) {
        return Err(DenyReason::CodeExpired);
    }
    check_pkce(code.challenge.as_ref(), req.verifier, policy.pkce)
}

fn check_pkce(
    challenge: Option<&Challenge>,
    verifier: Option<&str>,
    pkce: Pkce,
) -> Result<(), DenyReason> {
    match (challenge, verifier) {
        (None, None) if pkce == Pkce::Optional => Ok(()),
        (None, None) => Err(DenyReason::PkceRequired),
        // RFC 9700 §2.1.1: a verifier for a code issued without a challenge
        // is a PKCE downgrade; refuse it.
        (None, Some(_)) => Err(DenyReason::PkceVerifierUnexpected),
        (Some(_), None) => Err(DenyReason::PkceRequired),
        (Some(c), Some(v)) => {
            if !is_valid_verifier(v) {
                return Err(DenyReason::PkceVerifierInvalid);
            }
            let expected = match c {
                Challenge::S256(d) => d,
                Challenge::Plain(_) if pkce == Pkce::S256 => {
                    return Err(DenyReason::PkceMethodNotAllowed);
                }
                // The digest of the verifier itself: equal digests, equal
                // verifiers.
                Challenge::Plain(d) => d,
            };
            if bool::from(expected.ct_eq(&sha256(v))) {
                Ok(())
            } else {
                Err(DenyReason::PkceMismatch)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Debug` names the PKCE method and nothing else: never a digest of
    /// the challenge (a plain one is the verifier's S256 challenge) nor of
    /// the redirect URI. (A mutant printing nothing passed every test.)
    #[test]
    fn debug_names_the_method_and_hides_the_digests() {
        assert_eq!(format!("{:?}", Challenge::S256([7; 32])), "S256(..)");
        assert_eq!(format!("{:?}", Challenge::Plain([7; 32])), "Plain(..)");
        let state = CodeState::new(
            Timestamp::from_secs(5),
            "https://app.example/cb",
            Some(Challenge::Plain([7; 32])),
        );
        let d = format!("{state:?}");
        assert!(d.starts_with("CodeState {"), "{d}");
        assert!(d.contains("challenge_method: \"plain\""), "{d}");
        assert!(!d.contains("app.example") && !d.contains("[7"), "{d}");
    }

    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    fn policy(pkce: Pkce) -> ClientPolicy {
        ClientPolicy {
            pkce,
            ..ClientPolicy::default()
        }
    }

    /// RFC 7636 Appendix B.
    #[test]
    fn rfc7636_appendix_b_vector() {
        assert_eq!(URL_SAFE_NO_PAD.encode(sha256(VERIFIER)), CHALLENGE);
        let c = challenge_for(&policy(Pkce::S256), Some(CHALLENGE), Some("S256"))
            .unwrap()
            .unwrap();
        assert_eq!(check_pkce(Some(&c), Some(VERIFIER), Pkce::S256), Ok(()));
        let mut wrong = VERIFIER.to_owned();
        wrong.replace_range(0..1, "e");
        assert_eq!(
            check_pkce(Some(&c), Some(&wrong), Pkce::S256),
            Err(DenyReason::PkceMismatch)
        );
    }

    #[test]
    fn s256_policy_refuses_missing_and_plain_at_authorize() {
        let p = policy(Pkce::S256);
        assert_eq!(challenge_for(&p, None, None), Err(DenyReason::PkceRequired));
        assert_eq!(
            challenge_for(&p, Some(VERIFIER), None),
            Err(DenyReason::PkceMethodNotAllowed)
        );
        assert_eq!(
            challenge_for(&p, Some(VERIFIER), Some("plain")),
            Err(DenyReason::PkceMethodNotAllowed)
        );
        assert_eq!(
            challenge_for(&p, Some(CHALLENGE), Some("S512")),
            Err(DenyReason::PkceMethodNotAllowed)
        );
        assert_eq!(
            challenge_for(&p, Some("too-short"), Some("S256")),
            Err(DenyReason::PkceChallengeInvalid)
        );
        assert_eq!(
            challenge_for(&p, None, Some("S256")),
            Err(DenyReason::PkceChallengeInvalid)
        );
    }

    #[test]
    fn plain_and_optional_modes() {
        let p = policy(Pkce::S256OrPlain);
        let c = challenge_for(&p, Some(VERIFIER), None).unwrap().unwrap();
        assert_eq!(
            check_pkce(Some(&c), Some(VERIFIER), Pkce::S256OrPlain),
            Ok(())
        );
        // Tightened to s256 after issue: a plain code no longer passes.
        assert_eq!(
            check_pkce(Some(&c), Some(VERIFIER), Pkce::S256),
            Err(DenyReason::PkceMethodNotAllowed)
        );
        assert_eq!(challenge_for(&p, None, None), Err(DenyReason::PkceRequired));
        let o = policy(Pkce::Optional);
        assert_eq!(challenge_for(&o, None, None), Ok(None));
        assert_eq!(check_pkce(None, None, Pkce::Optional), Ok(()));
        assert_eq!(
            check_pkce(None, None, Pkce::S256),
            Err(DenyReason::PkceRequired)
        );
        assert_eq!(
            check_pkce(None, Some(VERIFIER), Pkce::Optional),
            Err(DenyReason::PkceVerifierUnexpected)
        );
    }

    /// What a code keeps costs a fixed 80 bytes (one allocation, whatever
    /// the redirect URI's length), and a family only the pointer to it.
    #[test]
    fn code_state_is_small_and_fixed() {
        assert_eq!(std::mem::size_of::<CodeState>(), 80);
        assert_eq!(std::mem::size_of::<Option<Box<CodeState>>>(), 8);
    }

    /// Regression: once kept past the exchange, a code's state must not
    /// stay for the family's whole life. The sweeper drops it once the code
    /// has outlived the longest lifetime any policy may give it, or the
    /// family is revoked; not a moment before, and never an unexchanged
    /// code's.
    #[test]
    fn exchanged_code_state_is_dropped_once_it_can_decide_nothing() {
        use crate::engine::{AuthorizeRequest, Engine, ExchangeRequest};
        use crate::token::FamilyId;

        let start = Timestamp::from_secs(1_700_000_000);
        let engine = Engine::builder().build().unwrap();
        let ip = Some("10.0.0.1".parse().unwrap());
        let authorize = || {
            let d = engine
                .at(start)
                .authorize(&AuthorizeRequest {
                    client: "c",
                    subject: "s",
                    scope: "openid",
                    redirect_uri: "https://a/cb",
                    code_challenge: Some(CHALLENGE),
                    code_challenge_method: Some("S256"),
                    ip,
                    dpop_jkt: None,
                })
                .unwrap();
            d.accepted().unwrap().clone()
        };
        let exchange = |code: &str| {
            let req = ExchangeRequest {
                code,
                code_verifier: Some(VERIFIER),
                client: "c",
                redirect_uri: "https://a/cb",
                ip,
                dpop: None,
            };
            engine.at(start).exchange(&req).unwrap();
        };
        let has_state = |id: FamilyId| engine.family_record(id).map(|r| r.0.code.is_some());
        let kept = authorize();
        exchange(&kept.token);
        let revoked = authorize();
        exchange(&revoked.token);
        engine.at(start).revoke_family(revoked.family).unwrap();
        let pending = authorize();

        let just_before =
            Timestamp::from_millis(start.saturating_add(MAX_CODE_TTL).as_millis() - 1);
        engine.at(just_before).sweep(100_000).unwrap();
        assert_eq!(has_state(kept.family), Some(true), "needed until the end");
        assert_eq!(has_state(revoked.family), Some(false), "revoked: needless");
        assert_eq!(has_state(pending.family), None, "an unused code goes whole");

        engine
            .at(start.saturating_add(MAX_CODE_TTL))
            .sweep(100_000)
            .unwrap();
        assert_eq!(has_state(kept.family), Some(false));
    }

    /// What each exchange outcome sets off: the exchange makes generation
    /// 1; a proven replay revokes the family and says so, any other replay
    /// says it did not; another client and a foreign network are reported;
    /// every other refusal is quiet.
    #[test]
    fn exchange_plans_say_what_follows() {
        use crate::policy::{AllowList, IpRange};
        use crate::token::FamilyId;

        let now = Timestamp::from_secs(1010);
        let challenge = challenge_for(&policy(Pkce::S256), Some(CHALLENGE), Some("S256")).unwrap();
        let code = Family {
            generation: Generation::CODE,
            code: Some(Box::new(CodeState::new(
                Timestamp::from_secs(1000),
                "https://a/cb",
                challenge,
            ))),
            ..Family::for_test(FamilyId::from_bytes([1; 16]))
        };
        let exchanged = Family {
            generation: Generation::FIRST,
            ..code.clone()
        };
        let req = |client, verifier| ExchangeCheck {
            client,
            redirect_uri: "https://a/cb",
            verifier: Some(verifier),
            ip: Some("192.0.2.1".parse().unwrap()),
            jkt: None,
            now,
        };
        let open = ClientPolicy::default();
        let ten = ClientPolicy {
            ip_allowlist: AllowList::new(&["10.0.0.0/8".parse::<IpRange>().unwrap()]),
            ..ClientPolicy::default()
        };
        let plan = decide_exchange(&code, &req("c", VERIFIER), &open);
        assert_eq!(plan, Plan::accept(AcceptKind::Exchanged, Change::Exchange));
        let plan = decide_exchange(&exchanged, &req("c", VERIFIER), &open);
        assert_eq!(
            plan,
            Plan::deny(DenyReason::CodeReused)
                .emitting(Signal::CodeReplay { revoked: true })
                .cascading(Cascade::Family(RevokeReason::CodeReplay))
        );
        let wrong = "x".repeat(43);
        let plan = decide_exchange(&exchanged, &req("c", &wrong), &open);
        assert_eq!(
            plan,
            Plan::deny(DenyReason::CodeSpent).emitting(Signal::CodeReplay { revoked: false })
        );
        let plan = decide_exchange(&code, &req("d", VERIFIER), &open);
        assert_eq!(
            plan,
            Plan::deny(DenyReason::ClientMismatch).emitting(Signal::ClientMismatch)
        );
        let plan = decide_exchange(&code, &req("c", VERIFIER), &ten);
        assert_eq!(
            plan,
            Plan::deny(DenyReason::IpNotAllowed).emitting(Signal::IpNotAllowed)
        );
        let plan = decide_exchange(&code, &req("c", &wrong), &open);
        assert_eq!(plan, Plan::deny(DenyReason::PkceMismatch));
    }

    #[test]
    fn verifier_syntax() {
        assert!(is_valid_verifier(VERIFIER));
        assert!(is_valid_verifier(&"a".repeat(128)));
        assert!(!is_valid_verifier(&"a".repeat(129)));
        assert!(!is_valid_verifier(&"a".repeat(42)));
        assert!(!is_valid_verifier(&format!("{}+", &VERIFIER[..42])));
        assert!(is_valid_verifier(
            "abc.DEF_ghi-JKL~0123456789012345678901234567890"
        ));
        let c = challenge_for(&policy(Pkce::S256), Some(CHALLENGE), Some("S256"))
            .unwrap()
            .unwrap();
        assert_eq!(
            check_pkce(Some(&c), Some("short"), Pkce::S256),
            Err(DenyReason::PkceVerifierInvalid)
        );
        assert_eq!(
            check_pkce(Some(&c), None, Pkce::S256),
            Err(DenyReason::PkceRequired)
        );
    }
}
