//! Opaque access tokens (README "Opaque access tokens"): minted for an
//! acceptance, verified in-process while unexpired and while their family
//! lives, never interchangeable with refresh tokens or codes.

mod common;

use std::time::Duration;

use common::{CLIENT, Harness, START};
use refresh_guard::{
    ACCESS_TOKEN_LEN, Accepted, AuthorizeRequest, DenyReason, Engine, Error, ExchangeRequest,
    Generation, IssueRequest, KeyId, KeyRing, KeySecret, PolicyOverrides, RedeemRequest, Timestamp,
};

const SCOPE: &str = "openid profile email";

fn harness() -> Harness {
    Harness::new(PolicyOverrides::new().access_token_ttl(Duration::from_secs(300)))
}

fn issue(h: &Harness) -> Accepted {
    h.engine
        .issue(&IssueRequest {
            client: CLIENT,
            subject: "user-42",
            scope: SCOPE,
            ip: None,
        })
        .unwrap()
        .accepted()
        .unwrap()
        .clone()
}

fn rotate(h: &Harness, a: &Accepted) -> Accepted {
    h.engine
        .redeem(&RedeemRequest::new(&a.token, CLIENT))
        .unwrap()
        .accepted()
        .expect("rotated")
        .clone()
}

#[test]
fn a_minted_token_verifies_with_its_claims_until_it_expires() {
    let h = harness();
    let a = issue(&h);
    let at = h.engine.access_token(&a, None).unwrap();
    assert!(at.token.starts_with("rga_"));
    assert_eq!(at.token.len(), ACCESS_TOKEN_LEN);
    assert_eq!(at.issued_at, START);
    assert_eq!(
        at.expires_at,
        START.saturating_add(Duration::from_secs(300))
    );
    assert_eq!(at.scope(), SCOPE);
    let info = h.engine.verify_access_token(&at.token).expect("active");
    assert_eq!(info.client(), CLIENT);
    assert_eq!(info.subject(), "user-42");
    assert_eq!(info.scope(), SCOPE);
    assert_eq!(info.family, a.family);
    assert_eq!(info.generation, Generation::FIRST);
    assert_eq!(
        (info.issued_at, info.expires_at),
        (at.issued_at, at.expires_at)
    );
    // The view at an exact time: valid to the last millisecond before
    // `exp`, not at it (RFC 7519 §4.1.4).
    let exp = at.expires_at.as_millis();
    let before = h.engine.at(Timestamp::from_millis(exp - 1));
    assert!(before.verify_access_token(&at.token).is_some());
    let at_exp = h.engine.at(Timestamp::from_millis(exp));
    assert_eq!(at_exp.verify_access_token(&at.token), None, "expired");
    h.clock.advance(Duration::from_secs(300));
    assert_eq!(h.engine.verify_access_token(&at.token), None, "expired");
}

#[test]
fn a_narrowed_token_grants_only_what_was_asked() {
    let h = harness();
    let a = issue(&h);
    let at = h.engine.access_token(&a, Some("email openid")).unwrap();
    // In the grant's order (RFC 6749 §3.3: order does not matter).
    assert_eq!(at.scope(), "openid email");
    let info = h.engine.verify_access_token(&at.token).unwrap();
    assert_eq!(info.scope(), "openid email");
    // Values outside the grant are left out, never granted.
    let at = h.engine.access_token(&a, Some("admin profile")).unwrap();
    assert_eq!(at.scope(), "profile");
    assert_eq!(
        h.engine.verify_access_token(&at.token).unwrap().scope(),
        "profile"
    );
}

/// Revoking a family kills its access tokens at once: what a JWT cannot
/// offer.
#[test]
fn revoking_the_family_makes_its_access_tokens_inactive() {
    let h = harness();
    let a = issue(&h);
    let at = h.engine.access_token(&a, None).unwrap();
    assert!(h.engine.verify_access_token(&at.token).is_some());
    assert!(h.engine.revoke_family(a.family).unwrap());
    assert_eq!(h.engine.verify_access_token(&at.token), None);
    // Reuse detection revokes too.
    let b = issue(&h);
    let b2 = rotate(&h, &b);
    let at2 = h.engine.access_token(&b2, None).unwrap();
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&b.token, CLIENT))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::ReuseDetected));
    assert_eq!(h.engine.verify_access_token(&at2.token), None);
}

/// A family past its lifetime takes its access tokens with it, even before
/// their own expiry.
#[test]
fn a_family_past_its_idle_ttl_takes_its_access_tokens_with_it() {
    let h = Harness::new(
        PolicyOverrides::new()
            .idle_ttl(Some(Duration::from_secs(60)))
            .access_token_ttl(Duration::from_secs(600)),
    );
    let a = issue(&h);
    let at = h.engine.access_token(&a, None).unwrap();
    h.clock.advance(Duration::from_secs(59));
    assert!(h.engine.verify_access_token(&at.token).is_some());
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(h.engine.verify_access_token(&at.token), None);
}

/// Decided: a rotation does not end the access tokens minted before it;
/// they live to their own expiry (README "Opaque access tokens": a client
/// may refresh early while requests with the old token are in flight).
#[test]
fn rotation_keeps_older_access_tokens_valid_until_they_expire() {
    let h = harness();
    let a = issue(&h);
    let old = h.engine.access_token(&a, None).unwrap();
    let b = rotate(&h, &a);
    let c = rotate(&h, &b);
    let new = h.engine.access_token(&c, None).unwrap();
    let info = h
        .engine
        .verify_access_token(&old.token)
        .expect("still valid");
    assert_eq!(info.generation, Generation::FIRST);
    assert_eq!(
        h.engine.verify_access_token(&new.token).unwrap().generation,
        Generation::new(3)
    );
    h.clock.advance(Duration::from_secs(300));
    assert_eq!(h.engine.verify_access_token(&old.token), None);
}

/// Every byte of the token, changed, makes it invalid: the tag covers every
/// field, and the codec admits one spelling per token.
#[test]
fn a_token_with_any_byte_changed_is_refused() {
    let h = harness();
    let a = issue(&h);
    let at = h.engine.access_token(&a, None).unwrap();
    let good = at.token.as_str().as_bytes().to_vec();
    for i in 0..good.len() {
        for flip in [0x01u8, 0x20] {
            let mut bad = good.clone();
            bad[i] ^= flip;
            let Ok(s) = std::str::from_utf8(&bad) else {
                continue;
            };
            assert_eq!(
                h.engine.verify_access_token(s),
                None,
                "byte {i} ^ {flip:#x}"
            );
        }
    }
    assert!(h.engine.verify_access_token(&at.token).is_some());
}

/// An access token is not a refresh token, nor the reverse: other prefix,
/// length and MAC domain. Presented where the other is expected, each is
/// refused without touching the family.
#[test]
fn access_and_refresh_tokens_do_not_cross() {
    let h = harness();
    let a = issue(&h);
    let at = h.engine.access_token(&a, None).unwrap();
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&at.token, CLIENT))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::InvalidToken));
    assert_eq!(
        DenyReason::InvalidToken.oauth_error().as_str(),
        "invalid_grant"
    );
    assert_eq!(h.engine.introspect(&at.token), None);
    assert_eq!(h.engine.verify_access_token(&a.token), None);
    // The access token's text with a refresh prefix, and the refresh
    // token's with the access prefix: malformed both ways.
    let swapped = format!("rgt_{}", &at.token[4..]);
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&swapped, CLIENT))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::InvalidToken));
    assert_eq!(
        h.engine
            .verify_access_token(&format!("rga_{}", &a.token[4..])),
        None
    );
    // Nothing was touched: the refresh token still rotates.
    rotate(&h, &a);
}

/// A code's acceptance grants no access token.
#[test]
fn a_code_grants_no_access_token() {
    let h = Harness::new(PolicyOverrides::new().pkce(refresh_guard::Pkce::Optional));
    let code = h
        .engine
        .authorize(&AuthorizeRequest {
            client: CLIENT,
            subject: "u",
            scope: SCOPE,
            redirect_uri: "https://app/cb",
            code_challenge: None,
            code_challenge_method: None,
            ip: None,
            dpop_jkt: None,
        })
        .unwrap()
        .accepted()
        .unwrap()
        .clone();
    assert!(matches!(
        h.engine.access_token(&code, None),
        Err(Error::InvalidArgument { .. })
    ));
    // The exchange's acceptance does.
    let rt = h
        .engine
        .exchange(&ExchangeRequest {
            code: &code.token,
            code_verifier: None,
            client: CLIENT,
            redirect_uri: "https://app/cb",
            ip: None,
            dpop: None,
        })
        .unwrap()
        .accepted()
        .unwrap()
        .clone();
    let at = h.engine.access_token(&rt, None).unwrap();
    assert!(h.engine.verify_access_token(&at.token).is_some());
}

/// Removing a key from the ring kills the access tokens it tagged, as it
/// does refresh tokens; a key rotation alone does not.
#[test]
fn a_key_removed_from_the_ring_makes_its_tokens_inactive() {
    let h = harness();
    let mut ring = KeyRing::new(KeyId(1), &KeySecret::from_bytes([1; 32]));
    h.engine.set_key_ring(ring.clone());
    let a = issue(&h);
    let old = h.engine.access_token(&a, None).unwrap();
    ring.add(KeyId(2), &KeySecret::from_bytes([2; 32])).unwrap();
    ring.set_active(KeyId(2)).unwrap();
    h.engine.set_key_ring(ring.clone());
    let new = h.engine.access_token(&a, None).unwrap();
    assert!(
        h.engine.verify_access_token(&old.token).is_some(),
        "rotated, kept"
    );
    assert!(h.engine.verify_access_token(&new.token).is_some());
    ring.remove(KeyId(1)).unwrap();
    h.engine.set_key_ring(ring);
    assert_eq!(h.engine.verify_access_token(&old.token), None, "key gone");
    assert!(h.engine.verify_access_token(&new.token).is_some());
}

/// Another engine (other keys, other families) knows nothing of the token.
#[test]
fn another_engines_token_is_unknown() {
    let h = harness();
    let a = issue(&h);
    let at = h.engine.access_token(&a, None).unwrap();
    let other = Engine::builder().build().unwrap();
    assert_eq!(other.verify_access_token(&at.token), None);
}
