//! DPoP at the token endpoint (README "DPoP at the token endpoint"): every
//! check of RFC 9449 §4.3 refuses a proof failing only it, naming it, and
//! spends neither the refresh token nor the code; nonces (RFC 9449 §8);
//! bound responses (`token_type` `DPoP`, `cnf.jkt`); `dpop_jkt` at the
//! admin authorization endpoint (RFC 9449 §10).

mod server_http;
mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use refresh_guard::{AccessTokenFormat, Dpop, PolicyOverrides, PolicySet};
use refresh_guard_server::dpop::NonceKey;
use serde_json::json;
use server_http::*;
use sha2::{Digest, Sha256};
use support::dpop_proof::ProofKey;

/// - `spa`: public, `dpop = allowed`;
/// - `nonce-spa`: the same, and proofs must carry a server nonce;
/// - `backend`: confidential, `dpop = allowed`;
/// - `opaque-spa`, `opaque-backend`: `spa` and `backend` with opaque
///   access tokens.
fn dpop_policies() -> PolicySet {
    let hash: [u8; 32] = Sha256::digest(BACKEND_SECRET.as_bytes()).into();
    let allowed = || PolicyOverrides::new().dpop(Dpop::Allowed);
    PolicySet::builder()
        .client("spa", allowed())
        .client("nonce-spa", allowed().dpop_nonce(true))
        .client("backend", allowed().client_secret_sha256(Some(hash)))
        .client(
            "opaque-spa",
            allowed().access_token_format(AccessTokenFormat::Opaque),
        )
        .client(
            "opaque-backend",
            allowed()
                .client_secret_sha256(Some(hash))
                .access_token_format(AccessTokenFormat::Opaque),
        )
        .build()
        .unwrap()
}

fn server(name: &str) -> TestServer {
    TestServer::with(name, |c| c.policy_set = Some(dpop_policies()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jti() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "jti-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn htu(s: &TestServer) -> String {
    format!("http://{}/oauth2/token", s.addr)
}

/// A fresh valid proof for this server's token endpoint.
fn proof(s: &TestServer, key: &ProofKey) -> String {
    key.proof("POST", &htu(s), now(), &jti(), None)
}

fn refresh_with(s: &TestServer, client: &str, rt: &str, proofs: &[&str]) -> Resp {
    let h: Vec<(&str, &str)> = proofs.iter().map(|p| ("DPoP", *p)).collect();
    s.form_with(
        "/oauth2/token",
        &format!("grant_type=refresh_token&refresh_token={rt}&client_id={client}"),
        &h,
    )
}

fn exchange_with(s: &TestServer, client: &str, code: &str, proofs: &[&str]) -> Resp {
    let h: Vec<(&str, &str)> = proofs.iter().map(|p| ("DPoP", *p)).collect();
    s.form_with(
        "/oauth2/token",
        &format!(
            "grant_type=authorization_code&code={code}&redirect_uri={}&client_id={client}&code_verifier={VERIFIER}",
            enc(REDIRECT)
        ),
        &h,
    )
}

/// A family of `client` bound to `key` (exchanged with its proof).
fn bound_family(s: &TestServer, client: &str, key: &ProofKey) -> String {
    let code = s.code(client, "user-1", "openid");
    let r = exchange_with(s, client, &code, &[&proof(s, key)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["token_type"], "DPoP");
    r.json()["refresh_token"].as_str().unwrap().to_owned()
}

/// Proofs failing exactly one check each, for `key` at `htu`: (what is
/// wrong, the proof, what the error description names).
fn broken_proofs(
    key: &ProofKey,
    other: &ProofKey,
    htu: &str,
) -> Vec<(&'static str, String, &'static str)> {
    let t = now();
    let claims = || json!({"jti": jti(), "htm": "POST", "htu": htu, "iat": t});
    let with_header = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut h = key.header();
        f(&mut h);
        key.sign(&h, &claims())
    };
    let with_claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims();
        f(&mut c);
        key.sign(&key.header(), &c)
    };
    let valid = key.sign(&key.header(), &claims());
    let (signed, _) = valid.rsplit_once('.').unwrap();
    let unsigned = |alg: &str| {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut h = key.header();
        h["alg"] = alg.into();
        let input = format!(
            "{}.{}",
            b64.encode(h.to_string()),
            b64.encode(claims().to_string())
        );
        // `none` has an empty signature; HS256 some 32-byte MAC.
        match alg {
            "none" => format!("{input}."),
            _ => format!("{input}.{}", b64.encode([7u8; 32])),
        }
    };
    let mut wrong_type_header = key.header();
    wrong_type_header["jwk"] = other.jwk();
    vec![
        ("not a JWT", "not.a.jwt.at-all".to_owned(), "not a JWT"),
        (
            "wrong typ",
            with_header(&|h| h["typ"] = "JWT".into()),
            "typ",
        ),
        ("alg none", unsigned("none"), "alg"),
        ("alg HS256", unsigned("HS256"), "alg"),
        (
            "private key in jwk",
            with_header(&|h| h["jwk"] = key.private_jwk()),
            "private key",
        ),
        (
            "bad signature",
            // Signed by another key of the same type, with this key's jwk.
            format!("{signed}.{}", other_sig(key, signed)),
            "signature",
        ),
        (
            "jwk of the wrong type for the alg",
            key.sign(&wrong_type_header, &claims()),
            " key on ",
        ),
        (
            "wrong htm",
            with_claims(&|c| c["htm"] = "GET".into()),
            "htm",
        ),
        (
            "htu: other path",
            with_claims(&|c| c["htu"] = htu.replace("/oauth2/token", "/oauth2/revoke").into()),
            "htu",
        ),
        (
            "htu: other host",
            with_claims(&|c| c["htu"] = htu.replace("127.0.0.1", "127.0.0.2").into()),
            "htu",
        ),
        (
            "iat too old",
            with_claims(&|c| c["iat"] = (t - 120).into()),
            "too old",
        ),
        (
            "iat too far ahead",
            with_claims(&|c| c["iat"] = (t + 60).into()),
            "future",
        ),
    ]
}

/// A signature over `signed` (the proof's header and claims, encoded) by
/// a different key of `key`'s type.
fn other_sig(key: &ProofKey, signed: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let other = match key {
        ProofKey::Es256(_) => ProofKey::es256(99),
        ProofKey::EdDsa(_) => ProofKey::eddsa(99),
    };
    let (h, c) = signed.split_once('.').unwrap();
    let h: serde_json::Value = serde_json::from_slice(&b64.decode(h).unwrap()).unwrap();
    let c: serde_json::Value = serde_json::from_slice(&b64.decode(c).unwrap()).unwrap();
    // Re-serialising the parsed JSON must give the same signing input.
    let jws = other.sign(&h, &c);
    assert!(
        jws.starts_with(signed),
        "re-encoding changed the signing input"
    );
    jws.rsplit_once('.').unwrap().1.to_owned()
}

/// Each RFC 9449 §4.3 check, alone, refuses the proof with
/// `invalid_dpop_proof` naming it, for both algorithms; none of the
/// refusals spends the refresh token, which then rotates with a proof
/// whose `htu` has a query (compared without it).
#[test]
fn each_proof_check_refuses_naming_it_and_spends_no_refresh_token() {
    let s = server("dpop-checks");
    for (key, other) in [
        (ProofKey::es256(1), ProofKey::eddsa(1)),
        (ProofKey::eddsa(2), ProofKey::es256(2)),
    ] {
        let rt = bound_family(&s, "spa", &key);
        let mut cases = broken_proofs(&key, &other, &htu(&s));
        let p1 = proof(&s, &key);
        let p2 = proof(&s, &key);
        let two = refresh_with(&s, "spa", &rt, &[&p1, &p2]);
        let d = two.assert_error(400, "invalid_dpop_proof");
        assert!(d.contains("exactly one DPoP header, found 2"), "{d}");
        for (what, p, names) in cases.drain(..) {
            let r = refresh_with(&s, "spa", &rt, &[&p]);
            assert_eq!(r.status, 400, "{} {what}: {}", key.alg(), r.text());
            let d = r.assert_error(400, "invalid_dpop_proof");
            assert!(d.contains(names), "{} {what}: {d}", key.alg());
            assert!(!d.contains(&p[..16]), "the proof is never echoed");
        }
        // Not spent: a valid proof, htu with a query and fragment, rotates.
        let with_query = format!("{}?x=1#f", htu(&s));
        let ok = key.proof("POST", &with_query, now(), &jti(), None);
        let r = refresh_with(&s, "spa", &rt, &[&ok]);
        assert_eq!(r.status, 200, "{} not spent: {}", key.alg(), r.text());
        let t = r.json();
        assert_eq!(t["token_type"], "DPoP");
        // The same proof again (with the new token): replayed.
        let rt2 = t["refresh_token"].as_str().unwrap();
        let d = refresh_with(&s, "spa", rt2, &[&ok]).assert_error(400, "invalid_dpop_proof");
        assert!(d.contains("jti was already used"), "{d}");
        let r = refresh_with(&s, "spa", rt2, &[&proof(&s, &key)]);
        assert_eq!(r.status, 200, "replay refusal spent nothing: {}", r.text());
    }
}

/// A refused proof at the code exchange leaves the code redeemable.
#[test]
fn a_refused_proof_does_not_spend_the_code() {
    let s = server("dpop-code");
    let key = ProofKey::es256(3);
    let code = s.code("spa", "user-1", "openid");
    for (what, p, names) in broken_proofs(&key, &ProofKey::eddsa(3), &htu(&s)) {
        let d = exchange_with(&s, "spa", &code, &[&p]).assert_error(400, "invalid_dpop_proof");
        assert!(d.contains(names), "{what}: {d}");
    }
    let r = exchange_with(&s, "spa", &code, &[&proof(&s, &key)]);
    assert_eq!(r.status, 200, "code not spent: {}", r.text());
}

/// Bound responses: `token_type` `DPoP`, the access token's `cnf.jkt` is
/// the RFC 7638 thumbprint of the proof's key, introspection shows `cnf`
/// for both tokens, and the metadata lists the algorithms.
#[test]
fn bound_tokens_carry_cnf_jkt_everywhere() {
    let s = server("dpop-cnf");
    let key = ProofKey::eddsa(4);
    let code = s.code("spa", "user-1", "openid");
    let r = exchange_with(&s, "spa", &code, &[&proof(&s, &key)]);
    let t = r.json();
    assert_eq!(t["token_type"], "DPoP");
    let at = t["access_token"].as_str().unwrap();
    assert_eq!(jwt_part(at, 1)["cnf"]["jkt"], key.jkt());
    let auth = format!("Bearer {ADMIN}");
    for token in [at, t["refresh_token"].as_str().unwrap()] {
        let i = s
            .form_with(
                "/oauth2/introspect",
                &format!("token={token}"),
                &[("Authorization", &auth)],
            )
            .json();
        assert_eq!(i["active"], true);
        assert_eq!(i["cnf"]["jkt"], key.jkt(), "{i}");
    }
    let m = s.get("/.well-known/oauth-authorization-server").json();
    assert_eq!(
        m["dpop_signing_alg_values_supported"],
        json!(["ES256", "EdDSA", "Ed25519"])
    );
    // Without a proof: a bearer token, no cnf.
    let plain = s.family("spa", "user-2", "openid");
    let r = s.refresh("spa", &plain).json();
    assert_eq!(r["token_type"], "Bearer");
    assert!(
        jwt_part(r["access_token"].as_str().unwrap(), 1)
            .get("cnf")
            .is_none()
    );
}

/// An opaque access token is bound through its family: a bound family's
/// is a `DPoP` token whose introspection carries the family's `cnf.jkt`;
/// an unbound family's is a bearer token without `cnf`. Regression: the
/// opaque response said `Bearer` and its introspection dropped `cnf`, so a
/// resource server would have accepted it without a proof.
#[test]
fn an_opaque_access_token_of_a_bound_family_is_dpop_bound() {
    let s = server("dpop-opaque");
    let key = ProofKey::eddsa(6);
    let code = s.code("opaque-spa", "user-1", "openid");
    let t = exchange_with(&s, "opaque-spa", &code, &[&proof(&s, &key)]).json();
    assert_eq!(t["token_type"], "DPoP", "{t}");
    let at = t["access_token"].as_str().unwrap();
    assert!(at.starts_with("rga_"), "{t}");
    let auth = format!("Bearer {ADMIN}");
    let introspect = |token: &str| {
        s.form_with(
            "/oauth2/introspect",
            &format!("token={token}"),
            &[("Authorization", &auth)],
        )
        .json()
    };
    let i = introspect(at);
    assert_eq!(i["active"], true, "{i}");
    assert_eq!(i["token_type"], "DPoP", "{i}");
    assert_eq!(i["cnf"]["jkt"], key.jkt(), "{i}");
    // Refreshed with the key's proof: still bound.
    let rt = t["refresh_token"].as_str().unwrap();
    let r = refresh_with(&s, "opaque-spa", rt, &[&proof(&s, &key)]).json();
    assert_eq!(r["token_type"], "DPoP", "{r}");
    assert_eq!(
        introspect(r["access_token"].as_str().unwrap())["cnf"]["jkt"],
        key.jkt()
    );
    // No proof: a bearer family, a bearer token.
    let plain = s.family("opaque-spa", "user-2", "openid");
    let r = s.refresh("opaque-spa", &plain).json();
    assert_eq!(r["token_type"], "Bearer", "{r}");
    let i = introspect(r["access_token"].as_str().unwrap());
    assert_eq!(i["active"], true, "{i}");
    assert_eq!(i["token_type"], "Bearer", "{i}");
    assert!(i.get("cnf").is_none(), "{i}");
}

/// A confidential client's family is never bound (RFC 9449 §5), so an
/// opaque token could not carry its proof's key: the server answers a JWT
/// with `cnf.jkt` instead. Regression: it answered an unbound opaque token
/// labelled `Bearer`, dropping the binding the client asked for.
#[test]
fn a_confidential_opaque_client_with_a_proof_gets_a_bound_jwt() {
    let s = server("dpop-opaque-backend");
    let key = ProofKey::es256(7);
    let code = s.code("opaque-backend", "user-1", "openid");
    let t = s
        .form_with(
            "/oauth2/token",
            &format!(
                "grant_type=authorization_code&code={code}&redirect_uri={}&code_verifier={VERIFIER}",
                enc(REDIRECT)
            ),
            &[
                ("Authorization", &basic("opaque-backend", BACKEND_SECRET)),
                ("DPoP", &proof(&s, &key)),
            ],
        )
        .json();
    assert_eq!(t["token_type"], "DPoP", "{t}");
    let at = t["access_token"].as_str().unwrap();
    assert!(!at.starts_with("rga_"), "{t}");
    assert_eq!(jwt_part(at, 1)["cnf"]["jkt"], key.jkt());
}

/// A confidential client's access token is bound to the proof's key, its
/// refresh token is not (RFC 9449 §5).
#[test]
fn a_confidential_clients_access_token_is_bound_and_its_refresh_token_is_not() {
    let s = server("dpop-backend");
    let key = ProofKey::es256(5);
    let code = s.code("backend", "user-1", "openid");
    let r = s.form_with(
        "/oauth2/token",
        &format!(
            "grant_type=authorization_code&code={code}&redirect_uri={}&code_verifier={VERIFIER}",
            enc(REDIRECT)
        ),
        &[
            ("Authorization", &basic("backend", BACKEND_SECRET)),
            ("DPoP", &proof(&s, &key)),
        ],
    );
    let t = r.json();
    assert_eq!(t["token_type"], "DPoP", "{t}");
    assert_eq!(
        jwt_part(t["access_token"].as_str().unwrap(), 1)["cnf"]["jkt"],
        key.jkt()
    );
    let auth = format!("Bearer {ADMIN}");
    let rt = t["refresh_token"].as_str().unwrap();
    let i = s
        .form_with(
            "/oauth2/introspect",
            &format!("token={rt}"),
            &[("Authorization", &auth)],
        )
        .json();
    assert!(i.get("cnf").is_none(), "{i}");
}

/// Another key's proof, or none, on a bound family: `invalid_grant` (the
/// proof is valid; the grant is bound elsewhere), nothing revoked.
#[test]
fn a_bound_family_refuses_other_keys_and_no_proof_without_revoking() {
    let s = server("dpop-mismatch");
    let key = ProofKey::es256(6);
    let rt = bound_family(&s, "spa", &key);
    let d = refresh_with(&s, "spa", &rt, &[&proof(&s, &ProofKey::es256(7))])
        .assert_error(400, "invalid_grant");
    assert!(d.contains("key"), "{d}");
    s.refresh("spa", &rt).assert_error(400, "invalid_grant");
    let r = refresh_with(&s, "spa", &rt, &[&proof(&s, &key)]);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A client under `dpop_nonce`: a proof without a nonce, with a wrong one
/// or an expired one gets `use_dpop_nonce` and a `DPoP-Nonce`; none of
/// them spends the token; the nonce handed out is accepted, and every
/// answer carries a fresh one.
#[test]
fn nonce_missing_wrong_or_expired_gets_use_dpop_nonce_and_spends_nothing() {
    let s = server("dpop-nonce");
    let key = ProofKey::eddsa(8);
    let code = s.code("nonce-spa", "user-1", "openid");
    let r = exchange_with(&s, "nonce-spa", &code, &[&proof(&s, &key)]);
    r.assert_error(400, "use_dpop_nonce");
    let nonce = r.header("dpop-nonce").expect("a DPoP-Nonce").to_owned();
    let with = |n: &str| key.proof("POST", &htu(&s), now(), &jti(), Some(n));
    let r = exchange_with(&s, "nonce-spa", &code, &[&with(&nonce)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("dpop-nonce").is_some(), "fresh nonce on success");
    let rt = r.json()["refresh_token"].as_str().unwrap().to_owned();

    let secret = std::fs::read_to_string(s.dir.path().join("dpop-nonce.key")).unwrap();
    let secret: [u8; 32] = (0..32)
        .map(|i| u8::from_str_radix(&secret.trim()[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let expired = NonceKey::new(&secret).current(now() - 180);
    for (what, p) in [
        ("missing", proof(&s, &key)),
        ("wrong", with("AAAAAAAAAAAAAAAAAAAAAA")),
        ("expired", with(&expired)),
    ] {
        let r = refresh_with(&s, "nonce-spa", &rt, &[&p]);
        r.assert_error(400, "use_dpop_nonce");
        assert!(r.header("dpop-nonce").is_some(), "{what}");
    }
    let r = refresh_with(&s, "nonce-spa", &rt, &[&with(&nonce)]);
    assert_eq!(r.status, 200, "not spent: {}", r.text());
}

/// `dpop_jkt` at the admin authorization endpoint binds the code (RFC 9449
/// §10): its exchange needs a proof from that key; a malformed one is a
/// 400 naming the field.
#[test]
fn dpop_jkt_at_authorization_binds_the_code() {
    let s = server("dpop-jkt");
    let key = ProofKey::es256(9);
    let authorize = |jkt: &str| {
        s.admin(
            "POST",
            "/admin/v1/authorizations",
            Some(json!({
                "client_id": "spa", "subject": "user-1", "scope": "openid",
                "redirect_uri": REDIRECT, "code_challenge": challenge(VERIFIER),
                "code_challenge_method": "S256", "dpop_jkt": jkt,
            })),
        )
    };
    let r = authorize("short");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("dpop_jkt"), "{}", r.text());
    let r = authorize(&key.jkt());
    assert_eq!(r.status, 201, "{}", r.text());
    let code = r.json()["code"].as_str().unwrap().to_owned();
    exchange_with(&s, "spa", &code, &[]).assert_error(400, "invalid_grant");
    exchange_with(&s, "spa", &code, &[&proof(&s, &ProofKey::es256(10))])
        .assert_error(400, "invalid_grant");
    let r = exchange_with(&s, "spa", &code, &[&proof(&s, &key)]);
    assert_eq!(r.status, 200, "{}", r.text());
}
