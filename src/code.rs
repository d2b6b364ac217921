//! Authorization codes bound to PKCE (RFC 7636): generation 0 of a family.
//!
//! A code is derived and verified like a refresh token (its own prefix and
//! MAC domain); what it must be checked against at the exchange (challenge,
//! redirect URI) lives in the family record until the exchange, then is
//! dropped. The checks here are pure; the engine applies them under the
//! family's lock, so one exchange wins and a replay is seen as one.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::Timestamp;
use crate::decision::DenyReason;
use crate::family::Family;
use crate::policy::{ClientPolicy, Pkce};

/// Longest redirect URI accepted.
pub const MAX_REDIRECT_URI_LEN: usize = 2048;

/// The challenge a code was issued with.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// SHA-256 of the verifier.
    S256([u8; 32]),
    /// The verifier itself (RFC 7636 `plain`).
    Plain(Box<str>),
}

impl fmt::Debug for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A plain challenge is the verifier itself: never print it.
        match self {
            Challenge::S256(_) => f.write_str("S256(..)"),
            Challenge::Plain(_) => f.write_str("Plain(<redacted>)"),
        }
    }
}

/// What the exchange checks a code against. Dropped once exchanged.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct CodeState {
    pub(crate) challenge: Option<Challenge>,
    pub(crate) redirect_uri: Box<str>,
}

impl fmt::Debug for CodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = match &self.challenge {
            Some(Challenge::S256(_)) => "S256",
            Some(Challenge::Plain(_)) => "plain",
            None => "none",
        };
        f.debug_struct("CodeState")
            .field("challenge_method", &method)
            .field("redirect_uri", &self.redirect_uri)
            .finish()
    }
}

/// RFC 7636 §4.1: 43 to 128 characters of `[A-Za-z0-9-._~]`.
pub(crate) fn is_valid_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// BASE64URL(SHA-256(verifier)) as the raw 32 bytes.
fn s256(verifier: &str) -> [u8; 32] {
    Sha256::digest(verifier.as_bytes()).into()
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
            Ok(Some(Challenge::Plain(challenge.into())))
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
    pub(crate) now: Timestamp,
}

/// The exchange decision, in order: client binding, revoked, replay,
/// redirect URI, expiry, PKCE, allow-list. `Ok` means exchange.
pub(crate) fn decide_exchange(
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
    let Some(code) = f.code.as_deref() else {
        // Exchanged before: RFC 6749 §4.1.2.
        return Err(DenyReason::CodeReused);
    };
    if *code.redirect_uri != *req.redirect_uri {
        return Err(DenyReason::RedirectUriMismatch);
    }
    if req.now >= f.created.saturating_add(policy.code_ttl) {
        return Err(DenyReason::CodeExpired);
    }
    check_pkce(code.challenge.as_ref(), req.verifier, policy.pkce)?;
    // The allow-list applies here in both `ip_check` modes: the exchange is
    // where the family is issued.
    if !policy.ip_allowlist.admits(req.ip) {
        return Err(DenyReason::IpNotAllowed);
    }
    Ok(())
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
            let ok = match c {
                Challenge::S256(expected) => expected.ct_eq(&s256(v)),
                Challenge::Plain(_) if pkce == Pkce::S256 => {
                    return Err(DenyReason::PkceMethodNotAllowed);
                }
                Challenge::Plain(p) => p.as_bytes().ct_eq(v.as_bytes()),
            };
            if bool::from(ok) {
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
        assert_eq!(URL_SAFE_NO_PAD.encode(s256(VERIFIER)), CHALLENGE);
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
