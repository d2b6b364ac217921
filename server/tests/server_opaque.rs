//! Opaque access tokens over HTTP (README "Opaque access tokens"): minted
//! per client by `access_token_format = "opaque"`, answered by RFC 7662
//! introspection while unexpired and while their family lives.

mod server_http;

use std::time::Duration;

use refresh_guard::{AccessTokenFormat, PolicyOverrides, PolicySet};
use server_http::*;
use sha2::{Digest, Sha256};

/// `spa` mints JWTs (the default); `app` (public) and `api` (confidential)
/// mint opaque tokens; `blink`'s opaque tokens live one millisecond.
fn set() -> PolicySet {
    let hash: [u8; 32] = Sha256::digest(BACKEND_SECRET.as_bytes()).into();
    let opaque = || PolicyOverrides::new().access_token_format(AccessTokenFormat::Opaque);
    PolicySet::builder()
        .client("app", opaque())
        .client("api", opaque().client_secret_sha256(Some(hash)))
        .client("blink", opaque().access_token_ttl(Duration::from_millis(1)))
        .build()
        .unwrap()
}

fn server(name: &str) -> TestServer {
    TestServer::with(name, |c| c.policy_set = Some(set()))
}

fn introspect(s: &TestServer, token: &str, extra: &str) -> serde_json::Value {
    let r = s.form_with(
        "/oauth2/introspect",
        &format!("token={}{extra}", enc(token)),
        &[("Authorization", &format!("Bearer {ADMIN}"))],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    r.json()
}

fn inactive() -> serde_json::Value {
    serde_json::json!({"active": false})
}

/// The exchange and the refresh grant of an opaque client answer an
/// `rga_` token; introspection reports it with its claims, whatever the
/// `token_type_hint`.
#[test]
fn opaque_access_token_introspects_active_with_its_claims() {
    let s = server("opaque-claims");
    let code = s.code("app", "user-1", "openid profile offline_access");
    let r = s.exchange("app", &code);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let t = r.json();
    let at = t["access_token"].as_str().unwrap();
    assert!(at.starts_with("rga_"), "{at}");
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 300);
    assert_eq!(t["scope"], "openid profile offline_access");
    for hint in [
        "",
        "&token_type_hint=access_token",
        "&token_type_hint=refresh_token",
    ] {
        let j = introspect(&s, at, hint);
        assert_eq!(j["active"], true, "{hint}: {j}");
        assert_eq!(j["client_id"], "app");
        assert_eq!(j["sub"], "user-1");
        assert_eq!(j["scope"], "openid profile offline_access");
        assert_eq!(j["token_type"], "Bearer");
        assert_eq!(j["iss"], format!("http://{}", s.addr));
        let (iat, exp) = (j["iat"].as_u64().unwrap(), j["exp"].as_u64().unwrap());
        assert!((299..=300).contains(&(exp - iat)), "{j}");
    }
    // A narrowed refresh: the token grants, and says, only what was asked.
    let rt = t["refresh_token"].as_str().unwrap();
    let r = s.form(
        "/oauth2/token",
        &format!("grant_type=refresh_token&refresh_token={rt}&client_id=app&scope=profile+openid"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["scope"], "openid profile");
    let narrowed = j["access_token"].as_str().unwrap();
    assert_eq!(introspect(&s, narrowed, "")["scope"], "openid profile");
    // Widening is still invalid_scope.
    let rt2 = j["refresh_token"].as_str().unwrap();
    s.form(
        "/oauth2/token",
        &format!("grant_type=refresh_token&refresh_token={rt2}&client_id=app&scope=admin"),
    )
    .assert_error(400, "invalid_scope");
    // The older access token outlives the rotation (README "Opaque access
    // tokens").
    assert_eq!(introspect(&s, at, "")["active"], true);
}

/// Revoking the refresh token (RFC 7009) revokes the family, and with it
/// every opaque access token minted for it (RFC 7009 §2.1: "SHOULD also
/// invalidate all access tokens based on the same authorization grant").
#[test]
fn revoking_the_family_makes_its_opaque_access_tokens_inactive() {
    let s = server("opaque-revoke");
    let code = s.code("app", "user-2", "openid");
    let t = s.exchange("app", &code).json();
    let at = t["access_token"].as_str().unwrap();
    let rt = t["refresh_token"].as_str().unwrap();
    assert_eq!(introspect(&s, at, "")["active"], true);
    let r = s.form("/oauth2/revoke", &format!("token={rt}&client_id=app"));
    assert_eq!(r.status, 200);
    assert_eq!(introspect(&s, at, ""), inactive());
}

#[test]
fn an_expired_opaque_access_token_is_inactive() {
    let s = server("opaque-expired");
    let code = s.code("blink", "user-3", "openid");
    let t = s.exchange("blink", &code).json();
    let at = t["access_token"].as_str().unwrap();
    assert!(at.starts_with("rga_"));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(introspect(&s, at, ""), inactive());
}

/// Every byte of the token changed, one at a time: inactive each time.
#[test]
fn a_tampered_opaque_access_token_is_inactive() {
    let s = server("opaque-tamper");
    let code = s.code("app", "user-4", "openid");
    let at = s.exchange("app", &code).json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..at.len() {
        let mut bad = at.as_bytes().to_vec();
        bad[i] ^= 0x01;
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(introspect(&s, &bad, ""), inactive(), "byte {i}");
    }
    assert_eq!(introspect(&s, &at, "")["active"], true);
}

/// An opaque access token presented as a refresh token is `invalid_grant`
/// and touches nothing; the refresh token still rotates.
#[test]
fn an_opaque_access_token_is_not_a_refresh_token() {
    let s = server("opaque-cross");
    let code = s.code("app", "user-5", "openid");
    let t = s.exchange("app", &code).json();
    let at = t["access_token"].as_str().unwrap();
    s.refresh("app", at).assert_error(400, "invalid_grant");
    let r = s.refresh("app", t["refresh_token"].as_str().unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Each client gets the format of its own policy; a confidential client
/// sees only its own tokens, of either format.
#[test]
fn each_client_gets_its_own_policys_format() {
    let s = server("opaque-formats");
    let jwt = s.exchange("spa", &s.code("spa", "user-6", "openid")).json();
    let jwt = jwt["access_token"].as_str().unwrap().to_owned();
    assert_eq!(jwt.split('.').count(), 3, "spa keeps RFC 9068 JWTs");
    assert_eq!(jwt_part(&jwt, 0)["typ"], "at+jwt");
    let opaque = s.exchange("app", &s.code("app", "user-6", "openid")).json();
    let opaque = opaque["access_token"].as_str().unwrap().to_owned();
    assert!(opaque.starts_with("rga_"));
    assert_eq!(introspect(&s, &jwt, "")["active"], true);
    assert_eq!(introspect(&s, &opaque, "")["active"], true);

    // The confidential opaque client, `api`, introspects its own token but
    // neither of the others.
    let code = s.code("api", "user-7", "read");
    let auth = basic("api", BACKEND_SECRET);
    let r = s.form_with(
        "/oauth2/token",
        &format!(
            "grant_type=authorization_code&code={code}&redirect_uri={}&code_verifier={VERIFIER}",
            enc(REDIRECT)
        ),
        &[("Authorization", &auth)],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let own = r.json()["access_token"].as_str().unwrap().to_owned();
    let as_api = |token: &str| {
        s.form_with(
            "/oauth2/introspect",
            &format!("token={}", enc(token)),
            &[("Authorization", &auth)],
        )
        .json()
    };
    let j = as_api(&own);
    assert_eq!(
        (&j["active"], &j["client_id"], &j["sub"]),
        (&true.into(), &"api".into(), &"user-7".into())
    );
    assert_eq!(as_api(&opaque), inactive());
    assert_eq!(as_api(&jwt), inactive());
}

/// Revoking an opaque access token revokes its family (RFC 7009 §2.1: the
/// server may revoke the refresh token as well; nothing per token is
/// stored to end it alone). Before, the endpoint answered 200 and the
/// token stayed active until it expired. Another client's token is left
/// alone, with the same 200 (RFC 7009 §2.2).
#[test]
fn revoking_an_opaque_access_token_revokes_its_family() {
    let s = server("opaque-revoke-at");
    let t = s.exchange("app", &s.code("app", "user-8", "openid")).json();
    let at = t["access_token"].as_str().unwrap();
    let rt = t["refresh_token"].as_str().unwrap();
    // Another client presenting it: 200, nothing revoked.
    let other = s.exchange("spa", &s.code("spa", "user-8", "openid")).json();
    let r = s.form(
        "/oauth2/revoke",
        &format!("token={at}&client_id=spa&token_type_hint=access_token"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(introspect(&s, at, "")["active"], true);
    let _ = other;
    // Its own client: the access token and the family are dead.
    let r = s.form(
        "/oauth2/revoke",
        &format!("token={at}&client_id=app&token_type_hint=access_token"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(introspect(&s, at, ""), inactive());
    s.refresh("app", rt).assert_error(400, "invalid_grant");
}
