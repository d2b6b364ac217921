//! What a standard client and a newcomer see (README "Server"): the RFC
//! 7009 revocation answer, and the admin API's indifference to the
//! request's content type.

mod server_http;

use server_http::*;

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
