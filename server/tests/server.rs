//! The server's HTTP contract (README "Server"): every endpoint and every
//! error it lists, against an in-process server on ephemeral ports.

mod server_http;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use server_http::*;

#[test]
fn metadata_and_jwks() {
    let s = TestServer::start("metadata");
    let r = s.get("/.well-known/oauth-authorization-server");
    assert_eq!(r.status, 200);
    let m = r.json();
    let issuer = format!("http://{}", s.addr);
    assert_eq!(m["issuer"], issuer);
    assert_eq!(m["token_endpoint"], format!("{issuer}/oauth2/token"));
    assert_eq!(m["revocation_endpoint"], format!("{issuer}/oauth2/revoke"));
    assert_eq!(
        m["introspection_endpoint"],
        format!("{issuer}/oauth2/introspect")
    );
    assert_eq!(m["jwks_uri"], format!("{issuer}/.well-known/jwks.json"));
    assert_eq!(
        m["grant_types_supported"],
        serde_json::json!(["authorization_code", "refresh_token"])
    );
    assert_eq!(
        m["code_challenge_methods_supported"],
        serde_json::json!(["S256"])
    );
    let methods = m["token_endpoint_auth_methods_supported"]
        .as_array()
        .unwrap();
    for want in ["client_secret_basic", "client_secret_post", "none"] {
        assert!(methods.iter().any(|x| x == want), "{want}");
    }

    let jwks = s.get("/.well-known/jwks.json").json();
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(key["alg"], "EdDSA");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(key["x"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );

    let h = s.get("/healthz");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    assert_eq!(s.get("/nope").status, 404);
}

#[test]
fn data_directory_files_are_created_with_mode_0600() {
    let s = TestServer::with("datadir", |c| {
        c.admin_token = refresh_guard_server::AdminTokenSource::Generate;
    });
    for f in ["mac-keys", "jwt-ed25519.key", "admin.token"] {
        let meta = std::fs::metadata(s.dir.path().join(f)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
        }
        assert!(meta.len() > 0);
    }
    assert!(s.dir.path().join("log").is_dir());
    // The generated token works on the admin listener.
    let token = std::fs::read_to_string(s.dir.path().join("admin.token")).unwrap();
    let auth = format!("Bearer {}", token.trim());
    let r = request(s.admin, "GET", "/healthz", &[("Authorization", &auth)], b"");
    assert_eq!(r.status, 200);
}

/// The code exchange and the refresh grant, with the RFC 9068 access token.
#[test]
fn code_exchange_and_refresh_rotate_with_signed_access_tokens() {
    let s = TestServer::start("flow");
    let code = s.code("spa", "user-1", "openid offline_access");
    assert!(code.starts_with("rgc_"));
    let r = s.exchange("spa", &code);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let t = r.json();
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 300);
    assert_eq!(t["scope"], "openid offline_access");
    let rt1 = t["refresh_token"].as_str().unwrap().to_owned();
    assert!(rt1.starts_with("rgt_"));

    // The access token: header, claims, and the signature under the JWKS key.
    let at = t["access_token"].as_str().unwrap();
    let header = jwt_part(at, 0);
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "at+jwt");
    let jwks = s.get("/.well-known/jwks.json").json();
    assert_eq!(header["kid"], jwks["keys"][0]["kid"]);
    let claims = jwt_part(at, 1);
    assert_eq!(claims["iss"], format!("http://{}", s.addr));
    assert_eq!(claims["sub"], "user-1");
    assert_eq!(claims["aud"], "spa");
    assert_eq!(claims["client_id"], "spa");
    assert_eq!(claims["scope"], "openid offline_access");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        300
    );
    assert!(claims["jti"].as_str().unwrap().len() >= 16);
    let x: [u8; 32] = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["x"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&x).unwrap();
    let (signed, sig) = at.rsplit_once('.').unwrap();
    let sig: [u8; 64] = URL_SAFE_NO_PAD.decode(sig).unwrap().try_into().unwrap();
    key.verify_strict(
        signed.as_bytes(),
        &ed25519_dalek::Signature::from_bytes(&sig),
    )
    .expect("access token verifies under the published key");

    // Rotation: a new refresh token each time.
    let r2 = s.refresh("spa", &rt1);
    assert_eq!(r2.status, 200, "{}", r2.text());
    assert_eq!(r2.header("cache-control"), Some("no-store"));
    let rt2 = r2.json()["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rt1, rt2);
    assert_eq!(r2.json()["scope"], "openid offline_access");

    // Reuse of the rotated-out token: invalid_grant naming the check, and
    // the family is gone.
    let d = s.refresh("spa", &rt1).assert_error(400, "invalid_grant");
    assert_eq!(d, "refresh token reuse detected; token family revoked");
    let d = s.refresh("spa", &rt2).assert_error(400, "invalid_grant");
    assert_eq!(d, "refresh token has been revoked");
    // Never an echo of the token.
    assert!(!s.refresh("spa", &rt2).text().contains(&rt2));
}

#[test]
fn grace_replay_returns_the_same_successor() {
    let s = TestServer::start("grace");
    let rt1 = s.family("graceful", "user-g", "openid");
    let a = s.refresh("graceful", &rt1).json();
    let b = s.refresh("graceful", &rt1).json();
    assert_eq!(a["refresh_token"], b["refresh_token"]);
    assert_ne!(a["access_token"], b["access_token"]);
}

#[test]
fn code_grant_errors() {
    let s = TestServer::start("code-errors");
    let code = s.code("spa", "user-2", "openid");
    let redirect = enc(REDIRECT);
    // Missing parameters.
    for (body, missing) in [
        (
            format!("code={code}&redirect_uri={redirect}&client_id=spa"),
            "grant_type",
        ),
        (
            format!("grant_type=authorization_code&redirect_uri={redirect}&client_id=spa"),
            "code",
        ),
        (
            format!("grant_type=authorization_code&code={code}&client_id=spa"),
            "redirect_uri",
        ),
        (
            format!("grant_type=authorization_code&code={code}&redirect_uri={redirect}"),
            "client_id",
        ),
    ] {
        let d = s
            .form("/oauth2/token", &body)
            .assert_error(400, "invalid_request");
        assert_eq!(d, format!("missing parameter: {missing}"));
    }
    // Wrong verifier, wrong redirect URI: invalid_grant with the engine's
    // description; the code stays usable (nothing was exchanged).
    let d = s
        .form(
            "/oauth2/token",
            &format!(
                "grant_type=authorization_code&code={code}&redirect_uri={redirect}&client_id=spa&code_verifier={}",
                "x".repeat(43)
            ),
        )
        .assert_error(400, "invalid_grant");
    assert_eq!(d, "code_verifier does not match code_challenge");
    let d = s
        .form(
            "/oauth2/token",
            &format!(
                "grant_type=authorization_code&code={code}&redirect_uri=https%3A%2F%2Fevil.example%2Fcb&client_id=spa&code_verifier={VERIFIER}"
            ),
        )
        .assert_error(400, "invalid_grant");
    assert_eq!(d, "redirect_uri does not match the authorization request");
    let d = s
        .form(
            "/oauth2/token",
            &format!(
                "grant_type=authorization_code&code={code}&redirect_uri={redirect}&client_id=spa"
            ),
        )
        .assert_error(400, "invalid_grant");
    assert!(d.starts_with("PKCE is required"), "{d}");
    // Another client presenting the code.
    let d = s
        .exchange("graceful", &code)
        .assert_error(400, "invalid_grant");
    assert!(d.contains("another client") || d.contains("invalid"), "{d}");
    // The real exchange, then a replay of the code.
    let code = s.code("spa", "user-2", "openid");
    assert_eq!(s.exchange("spa", &code).status, 200);
    let d = s.exchange("spa", &code).assert_error(400, "invalid_grant");
    assert_eq!(
        d,
        "authorization code was already used; tokens issued from it are revoked"
    );
    // A code that was never issued.
    s.exchange("spa", "rgc_garbage")
        .assert_error(400, "invalid_grant");
}

#[test]
fn malformed_and_duplicated_parameters_are_invalid_request() {
    let s = TestServer::start("malformed");
    let rt = s.family("spa", "user-3", "openid");
    let d = s
        .form(
            "/oauth2/token",
            &format!(
                "grant_type=refresh_token&refresh_token={rt}&refresh_token={rt}&client_id=spa"
            ),
        )
        .assert_error(400, "invalid_request");
    assert_eq!(d, "parameter refresh_token is repeated");
    assert!(!d.contains(&rt));
    let d = s
        .form(
            "/oauth2/token",
            &format!("grant_type=refresh_token&refresh_token={rt}&client_id=spa&client_id=spa"),
        )
        .assert_error(400, "invalid_request");
    assert_eq!(d, "parameter client_id is repeated");
    let d = s
        .form(
            "/oauth2/token",
            "grant_type=refresh_token&refresh_token=%zz&client_id=spa",
        )
        .assert_error(400, "invalid_request");
    assert_eq!(d, "malformed percent-encoding");
    let d = s
        .form("/oauth2/token", "grant_type=refresh_token&client_id=spa")
        .assert_error(400, "invalid_request");
    assert_eq!(d, "missing parameter: refresh_token");
    // Not a form at all.
    let r = request(
        s.addr,
        "POST",
        "/oauth2/token",
        &[("Content-Type", "application/json")],
        br#"{"grant_type":"refresh_token"}"#,
    );
    r.assert_error(400, "invalid_request");
    // The token is untouched by all of that.
    assert_eq!(s.refresh("spa", &rt).status, 200);
}

#[test]
fn unsupported_grant_type() {
    let s = TestServer::start("grant-type");
    let d = s
        .form(
            "/oauth2/token",
            "grant_type=password&username=a&password=b&client_id=spa",
        )
        .assert_error(400, "unsupported_grant_type");
    assert!(d.contains("authorization_code"), "{d}");
    s.form(
        "/oauth2/token",
        "grant_type=client_credentials&client_id=spa",
    )
    .assert_error(400, "unsupported_grant_type");
}

#[test]
fn refresh_may_narrow_scope_but_not_widen_it() {
    let s = TestServer::start("scope");
    let rt = s.family("spa", "user-4", "openid profile offline_access");
    let d = s
        .form(
            "/oauth2/token",
            &format!(
                "grant_type=refresh_token&refresh_token={rt}&client_id=spa&scope=openid+admin"
            ),
        )
        .assert_error(400, "invalid_scope");
    assert!(d.contains("exceeds"), "{d}");
    // invalid_scope did not spend the token: a narrower scope works with it.
    let r = s.form(
        "/oauth2/token",
        &format!("grant_type=refresh_token&refresh_token={rt}&client_id=spa&scope=profile"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["scope"], "profile");
    assert_eq!(
        jwt_part(j["access_token"].as_str().unwrap(), 1)["scope"],
        "profile"
    );
    // The refresh token keeps the original scope (RFC 6749 §6).
    let r = s.refresh("spa", j["refresh_token"].as_str().unwrap());
    assert_eq!(r.json()["scope"], "openid profile offline_access");
}

#[test]
fn confidential_client_authentication() {
    let s = TestServer::start("confidential");
    let code = s.code("backend", "user-5", "api");
    let redirect = enc(REDIRECT);
    let exchange = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={redirect}&code_verifier={VERIFIER}"
    );
    // No credentials at all.
    s.form("/oauth2/token", &format!("{exchange}&client_id=backend"))
        .assert_error(401, "invalid_client");
    // Wrong secret via Basic: 401 with WWW-Authenticate: Basic.
    let r = s.form_with(
        "/oauth2/token",
        &exchange,
        &[("Authorization", &basic("backend", "wrong"))],
    );
    r.assert_error(401, "invalid_client");
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
    // Wrong secret in the body: 401, no Basic challenge.
    let r = s.form(
        "/oauth2/token",
        &format!("{exchange}&client_id=backend&client_secret=wrong"),
    );
    r.assert_error(401, "invalid_client");
    assert_eq!(r.header("www-authenticate"), None);
    // Both methods at once.
    s.form_with(
        "/oauth2/token",
        &format!("{exchange}&client_secret={}", enc(BACKEND_SECRET)),
        &[("Authorization", &basic("backend", BACKEND_SECRET))],
    )
    .assert_error(400, "invalid_request");
    // A public client presenting a secret it does not have.
    s.form_with(
        "/oauth2/token",
        "grant_type=refresh_token&refresh_token=x",
        &[("Authorization", &basic("spa", "made-up"))],
    )
    .assert_error(401, "invalid_client");
    // client_secret_basic works (the failures above spent nothing).
    let r = s.form_with(
        "/oauth2/token",
        &exchange,
        &[("Authorization", &basic("backend", BACKEND_SECRET))],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rt = r.json()["refresh_token"].as_str().unwrap().to_owned();
    // client_secret_post works.
    let r = s.form(
        "/oauth2/token",
        &format!(
            "grant_type=refresh_token&refresh_token={rt}&client_id=backend&client_secret={}",
            enc(BACKEND_SECRET)
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // A public refresh of a confidential client's token is refused.
    let rt = r.json()["refresh_token"].as_str().unwrap().to_owned();
    s.refresh("backend", &rt)
        .assert_error(401, "invalid_client");
}

#[test]
fn client_binding_is_invalid_grant() {
    let s = TestServer::start("binding");
    let rt = s.family("spa", "user-6", "openid");
    let d = s
        .refresh("graceful", &rt)
        .assert_error(400, "invalid_grant");
    assert_eq!(d, "refresh token was issued to another client");
    s.refresh("spa", "rgt_not-a-token")
        .assert_error(400, "invalid_grant");
}

#[test]
fn oversized_body_is_413() {
    let s = TestServer::start("413");
    let big = format!(
        "grant_type=refresh_token&client_id=spa&pad={}",
        "a".repeat(17 * 1024)
    );
    let r = s.form("/oauth2/token", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    // Just under the limit is parsed (and fails for what it says).
    let ok = format!(
        "grant_type=refresh_token&client_id=spa&pad={}",
        "a".repeat(15 * 1024)
    );
    s.form("/oauth2/token", &ok)
        .assert_error(400, "invalid_request");
}

#[test]
fn revocation_rfc7009() {
    let s = TestServer::start("revoke");
    let rt = s.family("spa", "user-7", "openid");
    let other = s.family("graceful", "user-7", "openid");
    // Another client's token: 200, and not revoked.
    let r = s.form("/oauth2/revoke", &format!("token={other}&client_id=spa"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.refresh("graceful", &other).status, 200);
    // Own token, with a hint: 200, and revoked.
    let r = s.form(
        "/oauth2/revoke",
        &format!("token={rt}&token_type_hint=refresh_token&client_id=spa"),
    );
    assert_eq!(r.status, 200);
    let d = s.refresh("spa", &rt).assert_error(400, "invalid_grant");
    assert_eq!(d, "refresh token has been revoked");
    // Already revoked, unknown, garbage: 200.
    for t in [rt.as_str(), "rgt_unknown", "garbage"] {
        assert_eq!(
            s.form("/oauth2/revoke", &format!("token={t}&client_id=spa"))
                .status,
            200
        );
    }
    // Errors: missing token, missing client, bad client secret.
    let d = s
        .form("/oauth2/revoke", "client_id=spa")
        .assert_error(400, "invalid_request");
    assert_eq!(d, "missing parameter: token");
    s.form("/oauth2/revoke", "token=x")
        .assert_error(400, "invalid_request");
    s.form_with(
        "/oauth2/revoke",
        "token=x",
        &[("Authorization", &basic("backend", "wrong"))],
    )
    .assert_error(401, "invalid_client");
}

#[test]
fn introspection_rfc7662() {
    let s = TestServer::start("introspect");
    let code = s.code("backend", "user-8", "api read");
    let r = s.form_with(
        "/oauth2/token",
        &format!(
            "grant_type=authorization_code&code={code}&redirect_uri={}&code_verifier={VERIFIER}",
            enc(REDIRECT)
        ),
        &[("Authorization", &basic("backend", BACKEND_SECRET))],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.json();
    let rt = t["refresh_token"].as_str().unwrap();
    let at = t["access_token"].as_str().unwrap();
    let auth = basic("backend", BACKEND_SECRET);

    // The owning confidential client sees its refresh token.
    let r = s.form_with(
        "/oauth2/introspect",
        &format!("token={rt}"),
        &[("Authorization", &auth)],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let j = r.json();
    assert_eq!(j["active"], true);
    assert_eq!(j["client_id"], "backend");
    assert_eq!(j["sub"], "user-8");
    assert_eq!(j["scope"], "api read");
    assert_eq!(j["token_type"], "refresh_token");
    let (iat, exp) = (j["iat"].as_u64().unwrap(), j["exp"].as_u64().unwrap());
    assert!(exp > iat && exp - iat <= 30 * 86_400, "{j}");
    // And its access token.
    let j = s
        .form_with(
            "/oauth2/introspect",
            &format!("token={at}"),
            &[("Authorization", &auth)],
        )
        .json();
    assert_eq!(j["active"], true);
    assert_eq!(j["sub"], "user-8");

    // The admin token sees every client's tokens.
    let spa = s.family("spa", "user-9", "openid");
    let admin = format!("Bearer {ADMIN}");
    let j = s
        .form_with(
            "/oauth2/introspect",
            &format!("token={spa}"),
            &[("Authorization", &admin)],
        )
        .json();
    assert_eq!(j["active"], true);
    assert_eq!(j["client_id"], "spa");
    // A confidential client does not see another client's token.
    let j = s
        .form_with(
            "/oauth2/introspect",
            &format!("token={spa}"),
            &[("Authorization", &auth)],
        )
        .json();
    assert_eq!(j, serde_json::json!({"active": false}));
    // Rotated-out, revoked, garbage: inactive.
    let next = s.refresh("spa", &spa).json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    for t in [spa.as_str(), "garbage", "rgt_AAAA"] {
        let j = s
            .form_with(
                "/oauth2/introspect",
                &format!("token={t}"),
                &[("Authorization", &admin)],
            )
            .json();
        assert_eq!(j, serde_json::json!({"active": false}), "{t}");
    }
    let _ = next;
    // Callers: a public client, a wrong bearer, nobody.
    s.form("/oauth2/introspect", &format!("token={rt}&client_id=spa"))
        .assert_error(401, "invalid_client");
    s.form_with(
        "/oauth2/introspect",
        &format!("token={rt}"),
        &[("Authorization", "Bearer wrong-token-wrong-token")],
    )
    .assert_error(401, "invalid_client");
    s.form("/oauth2/introspect", &format!("token={rt}"))
        .assert_error(400, "invalid_request");
    s.form_with("/oauth2/introspect", "", &[("Authorization", &auth)])
        .assert_error(400, "invalid_request");
}

#[test]
fn admin_api_needs_the_bearer_token() {
    let s = TestServer::start("admin-auth");
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("POST", "/admin/v1/authorizations"),
        ("POST", "/admin/v1/subjects/u/revoke"),
        ("POST", "/admin/v1/policies/reload"),
        ("GET", "/admin/v1/policies/shadow"),
        ("POST", "/admin/v1/policies/promote"),
        ("DELETE", "/admin/v1/policies/shadow"),
    ] {
        let r = request(s.admin, method, path, &[], b"");
        assert_eq!(r.status, 401, "{method} {path}");
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
        let r = request(
            s.admin,
            method,
            path,
            &[("Authorization", "Bearer test-admin-token-0123456780")],
            b"",
        );
        assert_eq!(r.status, 401, "{method} {path}");
        let r = request(
            s.admin,
            method,
            path,
            &[("Authorization", &basic("a", ADMIN))],
            b"",
        );
        assert_eq!(r.status, 401, "{method} {path}");
    }
    // The admin API is not on the public listener.
    assert_eq!(s.get("/metrics").status, 404);
}

#[test]
fn admin_authorizations_and_subject_revocation() {
    let s = TestServer::start("admin");
    let r = s.admin(
        "POST",
        "/admin/v1/authorizations",
        Some(serde_json::json!({
            "client_id": "spa", "subject": "user-10", "scope": "openid",
            "redirect_uri": REDIRECT, "code_challenge": challenge(VERIFIER),
            "code_challenge_method": "S256",
        })),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let j = r.json();
    assert!(j["code"].as_str().unwrap().starts_with("rgc_"));
    assert_eq!(j["expires_in"], 60);
    // The policy requires S256: no challenge, or plain, is refused.
    let r = s.admin(
        "POST",
        "/admin/v1/authorizations",
        Some(serde_json::json!({
            "client_id": "spa", "subject": "user-10", "redirect_uri": REDIRECT,
        })),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"], "invalid_grant");
    let r = s.admin(
        "POST",
        "/admin/v1/authorizations",
        Some(serde_json::json!({
            "client_id": "spa", "subject": "u", "redirect_uri": REDIRECT,
            "code_challenge": VERIFIER, "code_challenge_method": "plain",
        })),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // Malformed JSON and unknown fields.
    let r = s.admin(
        "POST",
        "/admin/v1/authorizations",
        Some(serde_json::json!({"client_id": "spa"})),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_request");
    let r = s.admin(
        "POST",
        "/admin/v1/authorizations",
        Some(serde_json::json!({
            "client_id": "spa", "subject": "u", "redirect_uri": REDIRECT, "colour": "red",
        })),
    );
    assert_eq!(r.status, 400);

    // Subject revocation, all clients or one.
    let a = s.family("spa", "user-11", "openid");
    let b = s.family("graceful", "user-11", "openid");
    let c = s.family("spa", "user-11", "openid");
    let r = s.admin(
        "POST",
        "/admin/v1/subjects/user-11/revoke?client_id=graceful",
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"revoked": 1}));
    s.refresh("graceful", &b).assert_error(400, "invalid_grant");
    assert_eq!(s.refresh("spa", &a).status, 200);
    let r = s.admin("POST", "/admin/v1/subjects/user-11/revoke", None);
    assert_eq!(r.json(), serde_json::json!({"revoked": 2}));
    s.refresh("spa", &c).assert_error(400, "invalid_grant");
    // Percent-encoded subjects.
    let d = s.family("spa", "user 12/x", "openid");
    let r = s.admin("POST", "/admin/v1/subjects/user%2012%2Fx/revoke", None);
    assert_eq!(r.json(), serde_json::json!({"revoked": 1}));
    s.refresh("spa", &d).assert_error(400, "invalid_grant");
    let r = s.admin("POST", "/admin/v1/subjects/nobody/revoke", None);
    assert_eq!(r.json(), serde_json::json!({"revoked": 0}));
}

#[test]
fn metrics_count_decisions_events_and_latency() {
    let s = TestServer::start("metrics");
    let rt = s.family("spa", "user-13", "openid");
    let rt2 = s.refresh("spa", &rt).json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    s.refresh("spa", &rt).assert_error(400, "invalid_grant");
    let _ = rt2;
    s.form("/oauth2/token", "grant_type=password&client_id=spa");
    let r = s.admin("GET", "/metrics", None);
    assert_eq!(r.status, 200);
    // OpenMetrics text (what prometheus-client writes; Prometheus asks
    // for it first), ending with its EOF marker.
    assert_eq!(
        r.header("content-type").unwrap(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let m = r.text();
    assert!(m.ends_with("\n# EOF\n"), "{m}");
    for want in [
        "refresh_guard_decisions_total{client=\"spa\",outcome=\"code_issued\"} 1",
        "refresh_guard_decisions_total{client=\"spa\",outcome=\"exchanged\"} 1",
        "refresh_guard_decisions_total{client=\"spa\",outcome=\"rotated\"} 1",
        "refresh_guard_decisions_total{client=\"spa\",outcome=\"reuse_detected\"} 1",
        "refresh_guard_events_total{kind=\"reuse_detected\"} 1",
        "refresh_guard_revocations_total{reason=\"reuse_detected\"} 1",
        "refresh_guard_live_families 1",
        "refresh_guard_redeem_duration_seconds_count 2",
        "refresh_guard_redeem_duration_seconds_bucket{le=\"+Inf\"} 2",
        "refresh_guard_oauth_errors_total{endpoint=\"token\",error=\"unsupported_grant_type\"} 1",
        "refresh_guard_oauth_errors_total{endpoint=\"token\",error=\"invalid_grant\"} 1",
        "# TYPE refresh_guard_redeem_duration_seconds histogram",
        "refresh_guard_http_connections_open ",
        "refresh_guard_http_connections_total ",
    ] {
        assert!(m.contains(want), "missing {want:?} in\n{m}");
    }
    let version = s.handle().engine().policies().version().to_string();
    assert!(m.contains(&format!(
        "refresh_guard_policy_version_info{{version=\"{version}\"}} 1"
    )));
    let h = s.admin("GET", "/healthz", None);
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["policy_version"], version);
}

#[test]
fn client_ip_is_the_peer_unless_a_trusted_proxy_forwards() {
    // Untrusted peer: X-Forwarded-For is ignored; 127.0.0.1 is outside
    // the office allow-list.
    let s = TestServer::start("xff-untrusted");
    let code = s.admin(
        "POST",
        "/admin/v1/authorizations",
        Some(serde_json::json!({
            "client_id": "office", "subject": "u", "redirect_uri": REDIRECT,
            "code_challenge": challenge(VERIFIER), "code_challenge_method": "S256",
            "ip": "10.9.9.9",
        })),
    );
    assert_eq!(code.status, 201, "{}", code.text());
    let code = code.json()["code"].as_str().unwrap().to_owned();
    let body = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={}&client_id=office&code_verifier={VERIFIER}",
        enc(REDIRECT)
    );
    let d = s
        .form_with("/oauth2/token", &body, &[("X-Forwarded-For", "10.1.2.3")])
        .assert_error(400, "invalid_grant");
    assert_eq!(d, "refresh is not allowed from this network");
    drop(s);

    // Loopback is a trusted proxy: the nearest untrusted hop counts.
    let s = TestServer::with("xff-trusted", |c| {
        c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    });
    let code = s.admin(
        "POST",
        "/admin/v1/authorizations",
        Some(serde_json::json!({
            "client_id": "office", "subject": "u", "redirect_uri": REDIRECT,
            "code_challenge": challenge(VERIFIER), "code_challenge_method": "S256",
            "ip": "10.9.9.9",
        })),
    );
    let code = code.json()["code"].as_str().unwrap().to_owned();
    let body = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={}&client_id=office&code_verifier={VERIFIER}",
        enc(REDIRECT)
    );
    // The left-most entry is client-controlled: a spoofed 10.x before a
    // foreign hop does not help.
    let d = s
        .form_with(
            "/oauth2/token",
            &body,
            &[("X-Forwarded-For", "10.6.6.6, 198.51.100.7")],
        )
        .assert_error(400, "invalid_grant");
    assert_eq!(d, "refresh is not allowed from this network");
    let r = s.form_with(
        "/oauth2/token",
        &body,
        &[("X-Forwarded-For", "198.51.100.7, 10.1.2.3, 127.0.0.5")],
    );
    // 127.0.0.5 is a trusted hop; 10.1.2.3 is the client.
    assert_eq!(r.status, 200, "{}", r.text());
    let rt = r.json()["refresh_token"].as_str().unwrap().to_owned();
    let refresh = format!("grant_type=refresh_token&refresh_token={rt}&client_id=office");
    s.form("/oauth2/token", &refresh)
        .assert_error(400, "invalid_grant");
    let r = s.form_with(
        "/oauth2/token",
        &refresh,
        &[("X-Forwarded-For", "10.200.0.1")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Regression: a non-ASCII `X-Forwarded-For` hop was dropped from the
/// chain, so a client behind a trusted proxy took the proxy's own address
/// and passed an allow-list that holds the proxy's network. An unreadable
/// chain now yields no address, which no non-empty allow-list admits.
#[test]
fn an_unreadable_forwarding_chain_is_outside_the_allow_list() {
    // The proxy is 127.0.0.1; the clients' network holds it too.
    let s = TestServer::with("xff-unreadable", |c| {
        c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        c.policy_set = Some(
            refresh_guard::PolicySet::builder()
                .client(
                    "internal",
                    refresh_guard::PolicyOverrides::new()
                        .ip_allowlist(vec!["127.0.0.0/8".parse().unwrap()]),
                )
                .build()
                .unwrap(),
        );
    });
    let code = s.admin(
        "POST",
        "/admin/v1/authorizations",
        Some(serde_json::json!({
            "client_id": "internal", "subject": "u", "redirect_uri": REDIRECT,
            "code_challenge": challenge(VERIFIER), "code_challenge_method": "S256",
            "ip": "127.0.0.9",
        })),
    );
    assert_eq!(code.status, 201, "{}", code.text());
    let code = code.json()["code"].as_str().unwrap().to_owned();
    let body = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={}&client_id=internal&code_verifier={VERIFIER}",
        enc(REDIRECT)
    );
    for chain in [
        "\u{80}",
        "203.0.113.9, \u{80}",
        "nonsense",
        "127.0.0.7, ,127.0.0.1",
    ] {
        let d = s
            .form_with("/oauth2/token", &body, &[("X-Forwarded-For", chain)])
            .assert_error(400, "invalid_grant");
        assert_eq!(d, "refresh is not allowed from this network", "{chain:?}");
    }
    // A readable chain down to an untrusted hop still decides by that hop.
    s.form_with(
        "/oauth2/token",
        &body,
        &[("X-Forwarded-For", "\u{80}, 203.0.113.9")],
    )
    .assert_error(400, "invalid_grant");
    // Nothing was spent: the same code still exchanges from inside.
    let r = s.form_with("/oauth2/token", &body, &[("X-Forwarded-For", "127.0.0.7")]);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The header timeout is also the idle timeout of a keep-alive connection.
/// (How idle connections share the connection budget is in
/// tests/server_connections.rs.)
#[test]
fn header_timeout_closes_an_idle_keep_alive_connection() {
    let s = TestServer::with("limits", |c| {
        c.header_timeout = Duration::from_millis(1500);
    });
    let mut kept = TcpStream::connect(s.addr).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut raw = Vec::new();
    let _ = kept.read_to_end(&mut raw);
    let r = parse_response(&raw).expect("the response, then the close");
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "closed after {:?}",
        started.elapsed()
    );
}

#[test]
fn slow_body_is_408() {
    let s = TestServer::with("slow-body", |c| {
        c.body_timeout = Duration::from_millis(500);
    });
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(
        b"POST /oauth2/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\nConnection: close\r\n\r\ngrant_type=",
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = read_response(&mut c);
    assert_eq!(r.status, 408, "{}", r.text());
}

#[test]
fn graceful_shutdown_flushes_and_state_survives_restart() {
    let dir = TempDir::new("restart-inproc");
    let start = || {
        let mut c = config(dir.path());
        // Batched: acknowledged before durable, so only the shutdown flush
        // (or the next batch) makes the rotation survive.
        c.durability = refresh_guard::Durability::Batched(Duration::from_millis(200));
        refresh_guard_server::ServerHandle::start_with_workers(c, 2).unwrap()
    };
    let server = start();
    let s = TestServer {
        addr: server.addr(),
        admin: server.admin_addr(),
        server: Some(server),
        dir: TempDir::new("unused"),
    };
    let rt1 = s.family("spa", "user-14", "openid");
    let rt2 = s.refresh("spa", &rt1).json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(s); // graceful shutdown: open batches are flushed
    let server = start();
    let s = TestServer {
        addr: server.addr(),
        admin: server.admin_addr(),
        server: Some(server),
        dir: TempDir::new("unused"),
    };
    assert_eq!(s.refresh("spa", &rt2).status, 200);
    let d = s.refresh("spa", &rt1).assert_error(400, "invalid_grant");
    assert_eq!(d, "refresh token reuse detected; token family revoked");
}

/// Regression (policy-load errors reached the admin API as pre-rendered
/// `file:line:column: key: message` strings): a 422 for a directory that
/// does not load lists each problem as data — `file`, `line`, `column`,
/// `key`, `message` — beside `error` and `error_description` (README
/// "Server"). `want`: (line, key, start of the message) per problem.
#[track_caller]
fn assert_load_errors(
    body: &serde_json::Value,
    file: &std::path::Path,
    want: &[(u64, &str, &str)],
) {
    assert_eq!(body["error"], "invalid_policy_set", "{body}");
    assert!(body["error_description"].is_string(), "{body}");
    let errors = body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), want.len(), "{body}");
    for (e, (line, key, message)) in errors.iter().zip(want) {
        let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["column", "file", "key", "line", "message"], "{e}");
        assert_eq!(e["file"], file.display().to_string(), "{e}");
        assert_eq!(e["line"], *line, "{e}");
        assert!(e["column"].as_u64().unwrap() >= 1, "{e}");
        assert_eq!(e["key"], *key, "{e}");
        assert!(e["message"].as_str().unwrap().starts_with(message), "{e}");
    }
}

/// Reload, shadow, promote and drop through the admin API, from policy
/// files; a broken file is 422 naming file:line:column and changes nothing.
#[test]
fn policy_files_reload_shadow_promote_drop() {
    let policies = TempDir::new("policy-dir");
    let file = policies.path().join("policies.toml");
    std::fs::write(&file, "[defaults]\nidle_ttl = \"30d\"\n").unwrap();
    let s = TestServer::with("policies", |c| {
        c.policies = policies.path().to_owned();
        c.policy_set = None;
    });
    let v0 = s.handle().engine().policies().version().to_string();

    // A broken file: 422, every error located, the set in force unchanged.
    std::fs::write(
        &file,
        "[defaults]\nidle_ttl = \"30d\"\ngrace_period = \"1h\"\nbogus = 1\n",
    )
    .unwrap();
    let r = s.admin("POST", "/admin/v1/policies/reload", None);
    assert_eq!(r.status, 422, "{}", r.text());
    assert_load_errors(
        &r.json(),
        &file,
        &[
            (
                3,
                "defaults.grace_period",
                "1h is longer than the maximum 5m",
            ),
            (4, "defaults.bogus", "unknown knob `bogus`"),
        ],
    );
    assert_eq!(s.handle().engine().policies().version().to_string(), v0);
    let m = s.admin("GET", "/metrics", None).text();
    assert!(m.contains("refresh_guard_events_total{kind=\"policy_reload_failed\"} 1"));

    // Fixed: 200 with the new version, in force.
    std::fs::write(
        &file,
        "[defaults]\nidle_ttl = \"30d\"\n[clients.graceful]\ngrace_period = \"30s\"\n",
    )
    .unwrap();
    let r = s.admin("POST", "/admin/v1/policies/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let v1 = r.json()["version"].as_str().unwrap().to_owned();
    assert_ne!(v1, v0);
    assert_eq!(s.handle().engine().policies().version().to_string(), v1);

    // Shadow: nothing yet.
    assert_eq!(
        s.admin("GET", "/admin/v1/policies/shadow", None).status,
        404
    );
    assert_eq!(
        s.admin("POST", "/admin/v1/policies/promote", None).status,
        404
    );
    assert_eq!(
        s.admin("DELETE", "/admin/v1/policies/shadow", None).status,
        404
    );
    // A candidate that fails to load: 422.
    let candidate = TempDir::new("policy-candidate");
    let cfile = candidate.path().join("c.toml");
    std::fs::write(&cfile, "[defaults]\nidle_ttl = 5\n").unwrap();
    let body = serde_json::json!({ "dir": candidate.path() });
    let r = s.admin("POST", "/admin/v1/policies/shadow", Some(body.clone()));
    assert_eq!(r.status, 422, "{}", r.text());
    assert_load_errors(&r.json(), &cfile, &[(2, "defaults.idle_ttl", "")]);
    // A candidate that takes the grace away from `graceful`.
    std::fs::write(&cfile, "[defaults]\nidle_ttl = \"30d\"\n").unwrap();
    let r = s.admin("POST", "/admin/v1/policies/shadow", Some(body.clone()));
    assert_eq!(r.status, 200, "{}", r.text());
    let candidate_version = r.json()["version"].as_str().unwrap().to_owned();
    let rt = s.family("graceful", "user-sh", "openid");
    let next = s.refresh("graceful", &rt).json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(s.refresh("graceful", &rt).status, 200); // grace replay
    let report = s.admin("GET", "/admin/v1/policies/shadow", None);
    assert_eq!(report.status, 200, "{}", report.text());
    let j = report.json();
    assert_eq!(j["active"], v1);
    assert_eq!(j["candidate"], candidate_version);
    assert_eq!(j["changed"], 1, "{j}");
    let rows = j["clients"]["graceful"].as_array().unwrap();
    assert!(
        rows.iter().any(|r| r["active"] == "grace_replay"
            && r["candidate"] == "reuse_detected"
            && r["count"] == 1),
        "{j}"
    );
    // The shadow changed nothing: the family is alive.
    assert_eq!(s.refresh("graceful", &next).status, 200);
    let r = s.admin("POST", "/admin/v1/policies/promote", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], candidate_version);
    assert_eq!(
        s.handle().engine().policies().version().to_string(),
        candidate_version
    );
    assert_eq!(
        s.admin("GET", "/admin/v1/policies/shadow", None).status,
        404
    );
    // Drop: a candidate comes and goes without effect.
    assert_eq!(
        s.admin("POST", "/admin/v1/policies/shadow", Some(body))
            .status,
        200
    );
    assert_eq!(
        s.admin("DELETE", "/admin/v1/policies/shadow", None).status,
        204
    );
    assert_eq!(
        s.admin("GET", "/admin/v1/policies/shadow", None).status,
        404
    );
    assert_eq!(
        s.handle().engine().policies().version().to_string(),
        candidate_version
    );
    // Malformed body.
    let r = s.admin(
        "POST",
        "/admin/v1/policies/shadow",
        Some(serde_json::json!({"path": "x"})),
    );
    assert_eq!(r.status, 400);
}

/// The server refuses to start on a policy directory that does not load,
/// naming every problem.
#[test]
fn start_fails_on_a_broken_policy_directory() {
    let policies = TempDir::new("policy-broken");
    std::fs::write(
        policies.path().join("a.toml"),
        "[defaults]\ngrace_period = \"1h\"\n",
    )
    .unwrap();
    let data = TempDir::new("policy-broken-data");
    let mut c = config(data.path());
    c.policies = policies.path().to_owned();
    c.policy_set = None;
    let e = refresh_guard_server::ServerHandle::start(c).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("a.toml:2:"), "{text}");
    assert!(text.contains("grace_period"), "{text}");
}

/// With `--require-profile`, the server refuses to start on a set that
/// does not meet the profile, before it creates anything in its data
/// directory, and says which profiles; the reports are the error's.
#[test]
fn start_fails_on_a_set_that_breaks_a_required_profile() {
    let data = TempDir::new("profile-start-data");
    let mut c = config(data.path());
    c.policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples/spa");
    c.policy_set = None;
    let sf = refresh_guard::Profile::named("salesforce-appexchange").unwrap();
    let rfc = refresh_guard::Profile::named("rfc9700").unwrap();
    c.require_profiles = vec![rfc, sf];
    let e = refresh_guard_server::ServerHandle::start(c).unwrap_err();
    let refresh_guard_server::ServerError::ProfileNotMet { reports } = &e else {
        panic!("{e}");
    };
    assert_eq!(reports.len(), 1, "only the profile not met");
    assert_eq!(reports[0].profile, "salesforce-appexchange");
    assert_eq!(reports[0].not_met, 2);
    assert_eq!(
        e.to_string(),
        "the policy set does not meet the required profile salesforce-appexchange"
    );
    assert_eq!(std::fs::read_dir(data.path()).unwrap().count(), 0);
}

/// With `--require-profile`, a reload (or a shadow candidate, which only a
/// promotion would put in force) that breaks the profile is a 422 carrying
/// the report as JSON, and the set in force stays; `/metrics` counts the
/// controls not met of the profiles the server was started with.
#[test]
fn reload_that_breaks_a_required_profile_is_422_with_the_report() {
    let policies = TempDir::new("profile-reload");
    let file = policies.path().join("p.toml");
    let good = "[defaults]\n";
    std::fs::write(&file, good).unwrap();
    let rfc = refresh_guard::Profile::named("rfc9700").unwrap();
    let fapi = refresh_guard::Profile::named("fapi2-refresh").unwrap();
    let s = TestServer::with("profile-reload", |c| {
        c.policies = policies.path().to_owned();
        c.policy_set = None;
        c.require_profiles = vec![rfc];
        c.report_profiles = vec![fapi, rfc];
    });
    let v0 = s.handle().engine().policies().version();
    let gauge = |m: &str, profile: &str, scope: &str| -> Option<u64> {
        let prefix = format!(
            "refresh_guard_profile_controls_not_met{{profile=\"{profile}\",scope=\"{scope}\"}} "
        );
        m.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(|n| n.parse().unwrap())
    };
    let m = s.admin("GET", "/metrics", None).text();
    assert_eq!(gauge(&m, "rfc9700", "defaults"), Some(0), "{m}");
    assert!(gauge(&m, "fapi2-refresh", "defaults").unwrap() > 0, "{m}");
    assert_eq!(gauge(&m, "salesforce-appexchange", "defaults"), None);

    // Reuse only reported: RFC 9700 §4.14.2 is not met.
    std::fs::write(
        &file,
        "[defaults]\n[clients.app]\non_reuse = \"report_only\"\n",
    )
    .unwrap();
    let refused = refresh_guard::PolicySet::load_dir(policies.path()).unwrap();
    let r = s.admin("POST", "/admin/v1/policies/reload", None);
    assert_eq!(r.status, 422, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"], "profile_not_met", "{body}");
    assert_eq!(body["version"], refused.version().to_string());
    let want = serde_json::to_value([refused.check_profile(rfc)]).unwrap();
    assert_eq!(body["reports"], want);
    let row = &body["reports"][0]["scopes"][1]["controls"];
    let reuse = row
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["control"] == "reuse-revokes")
        .unwrap();
    assert_eq!(reuse["status"], "not_met");
    assert_eq!(
        reuse["evidence"][0]["origin"]["file"],
        file.display().to_string()
    );
    assert_eq!(reuse["evidence"][0]["origin"]["line"], 3);
    assert_eq!(
        s.handle().engine().policies().version(),
        v0,
        "old set stays"
    );

    // The same set as a shadow candidate: refused the same way.
    let body = serde_json::json!({ "dir": policies.path() });
    let r = s.admin("POST", "/admin/v1/policies/shadow", Some(body));
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["error"], "profile_not_met");
    assert_eq!(
        s.admin("GET", "/admin/v1/policies/shadow", None).status,
        404
    );

    // A set that meets it goes in, and the gauges follow it.
    std::fs::write(&file, "[defaults]\n[clients.app]\ncode_ttl = \"2m\"\n").unwrap();
    let r = s.admin("POST", "/admin/v1/policies/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let m = s.admin("GET", "/metrics", None).text();
    assert_eq!(gauge(&m, "rfc9700", "clients.app"), Some(0), "{m}");
    let fapi_app = gauge(&m, "fapi2-refresh", "clients.app").unwrap();
    assert_eq!(
        fapi_app,
        gauge(&m, "fapi2-refresh", "defaults").unwrap() + 1,
        "{m}"
    );
}

/// Regression: the server used an existing data directory (keys, admin
/// token, store) that every user could read. It refuses to start, naming
/// the directory and the fix.
#[cfg(unix)]
#[test]
fn server_refuses_a_data_directory_other_users_can_reach() {
    use refresh_guard_server::{AdminToken, AdminTokenSource, Config, ServerError, ServerHandle};
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("server-exposed");
    let data = dir.path();
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        policy_set: Some(refresh_guard::PolicySet::default()),
        data: data.to_path_buf(),
        admin_token: AdminTokenSource::Value(AdminToken::new("0123456789abcdef").unwrap()),
        ..Config::default()
    };
    match ServerHandle::start(config) {
        Err(e @ ServerError::Exposed { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(&format!("chmod o-rwx {}", data.display())),
                "{text}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_dir(data).unwrap().count(),
        0,
        "nothing written"
    );
}
