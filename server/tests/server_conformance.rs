//! What a standard client and a newcomer see (README "Server"): the RFC
//! 8414 metadata document, the RFC 7009 revocation answer, and the admin
//! API's indifference to the request's content type.

mod server_http;

use server_http::*;

const LOGIN: &str = "https://login.example/authorize";

/// Regression: the metadata advertised the `code` response type without the
/// `authorization_endpoint` RFC 8414 §2 then requires. `--authorization-
/// endpoint` names it; without it the field is omitted, never invented.
#[test]
fn metadata_names_the_authorization_endpoint_when_configured() {
    let s = TestServer::with("meta-authz", |c| {
        c.authorization_endpoint = Some(LOGIN.to_owned());
    });
    let m = s.get("/.well-known/oauth-authorization-server").json();
    assert_eq!(m["authorization_endpoint"], LOGIN);
    assert_eq!(m["response_types_supported"], serde_json::json!(["code"]));

    let s = TestServer::start("meta-no-authz");
    let m = s.get("/.well-known/oauth-authorization-server").json();
    assert!(m.get("authorization_endpoint").is_none(), "{m}");
}

/// An authorization endpoint the metadata could not carry is refused at
/// start, naming what is wrong.
#[test]
fn a_malformed_authorization_endpoint_is_refused_at_start() {
    for (bad, why) in [
        ("login.example/authorize", "http(s) URL"),
        ("https://login.example/a#frag", "fragment"),
        ("https:///authorize", "no host"),
    ] {
        let dir = TempDir::new("meta-bad");
        let mut c = config(dir.path());
        c.authorization_endpoint = Some(bad.to_owned());
        let e = refresh_guard_server::ServerHandle::start(c)
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"))
            .to_string();
        assert!(
            e.contains("authorization endpoint") && e.contains(why),
            "{bad}: {e}"
        );
    }
}

fn methods(s: &TestServer) -> serde_json::Value {
    let m = s.get("/.well-known/oauth-authorization-server").json();
    m["code_challenge_methods_supported"].clone()
}

/// Regression: `code_challenge_methods_supported` was the constant `["S256"]`
/// whatever the policies accept. It follows the set in force, reloads
/// included: `plain` appears when a client the set governs may use it.
#[test]
fn metadata_code_challenge_methods_follow_the_policies_in_force() {
    let dir = TempDir::new("meta-pkce-policies");
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[clients.spa]\npkce = \"s256\"\n").unwrap();
    let s = TestServer::with("meta-pkce", |c| {
        c.policies = dir.path().to_owned();
        c.policy_set = None;
    });
    assert_eq!(methods(&s), serde_json::json!(["S256"]));

    std::fs::write(&file, "[clients.legacy]\npkce = \"s256_or_plain\"\n").unwrap();
    let r = s.admin("POST", "/admin/v1/policies/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(methods(&s), serde_json::json!(["S256", "plain"]));

    // `[defaults]` counts only while it governs unlisted clients.
    std::fs::write(
        &file,
        "unknown_clients = \"refuse\"\n[defaults]\npkce = \"optional\"\n\
         [clients.spa]\npkce = \"s256\"\n",
    )
    .unwrap();
    let r = s.admin("POST", "/admin/v1/policies/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(methods(&s), serde_json::json!(["S256"]));

    std::fs::write(&file, "[defaults]\npkce = \"optional\"\n").unwrap();
    let r = s.admin("POST", "/admin/v1/policies/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(methods(&s), serde_json::json!(["S256", "plain"]));
}

/// Regression: a successful revocation answered 200 with an empty body
/// labelled `application/json`, which is not JSON. RFC 7009 §2.2 asks only
/// for 200; the answer is now empty and carries no content type.
#[test]
fn successful_revocation_is_200_with_an_empty_untyped_body() {
    let s = TestServer::start("revoke-empty");
    let rt = s.family("spa", "user-1", "openid");
    for token in [rt.as_str(), "rgt_unknown"] {
        let r = s.form("/oauth2/revoke", &format!("token={token}&client_id=spa"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.body.is_empty(), "{}", r.text());
        assert_eq!(r.header("content-type"), None, "{:?}", r.headers);
        assert_eq!(r.header("content-length"), Some("0"));
    }
    s.refresh("spa", &rt).assert_error(400, "invalid_grant");
}

/// The admin API reads its bodies as JSON whatever `Content-Type` says
/// (README "Server"): with `application/json`, with curl's default
/// `application/x-www-form-urlencoded`, and with none, the answer is the
/// same; a body that is not JSON is refused the same way under each.
#[test]
fn admin_api_reads_json_with_or_without_a_json_content_type() {
    let s = TestServer::start("admin-ctype");
    let auth = format!("Bearer {ADMIN}");
    let body = serde_json::json!({
        "client_id": "spa", "subject": "user-1", "scope": "openid",
        "redirect_uri": REDIRECT, "code_challenge": challenge(VERIFIER),
        "code_challenge_method": "S256",
    })
    .to_string();
    let post = |content_type: Option<&str>, body: &str| {
        let mut h = vec![("Authorization", auth.as_str())];
        if let Some(t) = content_type {
            h.push(("Content-Type", t));
        }
        request(
            s.admin,
            "POST",
            "/admin/v1/authorizations",
            &h,
            body.as_bytes(),
        )
    };
    for content_type in [
        Some("application/json"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let r = post(content_type, &body);
        assert_eq!(r.status, 201, "{content_type:?}: {}", r.text());
        let code = r.json()["code"].as_str().unwrap().to_owned();
        assert_eq!(s.exchange("spa", &code).status, 200, "{content_type:?}");
        let r = post(content_type, "client_id=spa");
        r.assert_error(400, "invalid_request");
    }
}

/// Regression: under `unknown_clients = "refuse"`, a client the set does not
/// list that authenticated with HTTP Basic got a 400; RFC 6749 §5.2 asks for
/// 401 with `WWW-Authenticate` whenever the Authorization header was used.
/// (A public client sends Basic with an empty password.) Without the
/// header it stays the engine's 400 `invalid_client`.
#[test]
fn an_unlisted_client_using_basic_gets_401_with_the_scheme() {
    let dir = TempDir::new("refuse-basic-policies");
    std::fs::write(
        dir.path().join("p.toml"),
        "unknown_clients = \"refuse\"\n[clients.spa]\n",
    )
    .unwrap();
    let s = TestServer::with("refuse-basic", |c| {
        c.policies = dir.path().to_owned();
        c.policy_set = None;
    });
    let body = "grant_type=refresh_token&refresh_token=rgt_unknown";
    let r = s.form_with(
        "/oauth2/token",
        body,
        &[("Authorization", &basic("stranger", ""))],
    );
    r.assert_error(401, "invalid_client");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Basic")),
        "{:?}",
        r.headers
    );
    let r = s.form("/oauth2/token", &format!("{body}&client_id=stranger"));
    r.assert_error(400, "invalid_client");
}
