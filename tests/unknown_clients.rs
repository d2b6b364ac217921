//! `unknown_clients` (README "Policy files"): by default `[defaults]`
//! serves a client id the set does not list; with `"refuse"` such a client
//! is denied `unknown_client` (OAuth `invalid_client`) at issuance,
//! authorization, code exchange and refresh, before any record is read or
//! written, and a shadow candidate that refuses counts its refusals.

mod common;

use std::path::Path;

use common::{Harness, START, ip};
use refresh_guard::RedeemRequest;
use refresh_guard::{
    AuthorizeRequest, DenyReason, Engine, ExchangeRequest, IssueRequest, OAuthError,
    PolicyOverrides, PolicySet, Status, UnknownClients,
};

const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

fn set(listed: &[&str], u: UnknownClients) -> PolicySet {
    let mut b = PolicySet::builder().unknown_clients(u);
    for id in listed {
        b = b.client(*id, PolicyOverrides::new());
    }
    b.build().unwrap()
}

fn refusing(listed: &[&str]) -> PolicySet {
    set(listed, UnknownClients::Refuse)
}

fn issue(e: &Engine, client: &str) -> refresh_guard::Decision {
    e.issue(&IssueRequest {
        client,
        subject: "alice",
        scope: "openid",
        ip: Some(ip("10.0.0.1")),
    })
    .unwrap()
}

fn authorize(e: &Engine, client: &str) -> refresh_guard::Decision {
    e.authorize(&AuthorizeRequest {
        client,
        subject: "alice",
        scope: "openid",
        redirect_uri: "https://app.example/cb",
        code_challenge: Some(CHALLENGE),
        code_challenge_method: Some("S256"),
        ip: Some(ip("10.0.0.1")),
        dpop_jkt: None,
    })
    .unwrap()
}

fn exchange(e: &Engine, code: &str, client: &str) -> refresh_guard::Decision {
    e.exchange(&ExchangeRequest {
        code,
        code_verifier: Some(VERIFIER),
        client,
        redirect_uri: "https://app.example/cb",
        ip: Some(ip("10.0.0.1")),
        dpop: None,
    })
    .unwrap()
}

fn redeem(e: &Engine, token: &str, client: &str) -> refresh_guard::Decision {
    e.redeem(&RedeemRequest::new(token, client).ip(ip("10.0.0.1")))
        .unwrap()
}

#[test]
fn an_unlisted_client_is_served_by_defaults_unless_refused() {
    let h = Harness::with_set(set(&["app"], UnknownClients::Defaults));
    let t = issue(&h.engine, "other").accepted().expect("served").token;
    assert!(redeem(&h.engine, &t, "other").accepted().is_some());
}

#[test]
fn a_refused_client_gets_no_family_and_no_code() {
    let h = Harness::with_set(refusing(&["app"]));
    for d in [issue(&h.engine, "other"), authorize(&h.engine, "other")] {
        assert_eq!(d.deny_reason(), Some(DenyReason::UnknownClient));
        assert_eq!(
            DenyReason::UnknownClient.oauth_error(),
            OAuthError::InvalidClient
        );
    }
    let stats = h.engine.stats();
    assert_eq!(stats.families, 0);
    assert_eq!(stats.outcome("unknown_client"), 2);
    assert!(h.sink.events().is_empty());
    // A listed client is served as before.
    assert!(issue(&h.engine, "app").accepted().is_some());
    assert!(authorize(&h.engine, "app").accepted().is_some());
}

#[test]
fn a_refused_client_redeeming_changes_nothing() {
    let h = Harness::with_set(refusing(&["app"]));
    let t1 = issue(&h.engine, "app").accepted().unwrap().token;
    let a = redeem(&h.engine, &t1, "app").accepted().unwrap().clone();
    let t2 = a.token;
    let gen_of = || h.engine.family_record(a.family).unwrap().generation();
    let g = gen_of();
    let events = h.sink.events().len();

    // Another client, unlisted: refused before the token is looked at, so
    // no client_mismatch event, and a spent token revokes nothing.
    for t in [&t2, &t1] {
        let d = redeem(&h.engine, t, "other");
        assert_eq!(d.deny_reason(), Some(DenyReason::UnknownClient));
    }
    // The family's own client, no longer listed: its spent token would be
    // reuse and revoke the family; refused, it touches nothing.
    h.engine.swap_policies(refusing(&["web"]));
    for t in [&t1, &t2] {
        let d = redeem(&h.engine, t, "app");
        assert_eq!(d.deny_reason(), Some(DenyReason::UnknownClient));
    }
    let record = h.engine.family_record(a.family).unwrap();
    assert_eq!(record.status(), Status::Active);
    assert_eq!(gen_of(), g);
    // Only the swap was an event.
    assert_eq!(h.sink.events().len(), events + 1);

    // Listed again, the unspent token still rotates.
    h.engine.swap_policies(refusing(&["app"]));
    assert!(redeem(&h.engine, &t2, "app").accepted().is_some());
}

#[test]
fn a_refused_client_exchanging_a_code_changes_nothing() {
    let h = Harness::with_set(refusing(&["app"]));
    let code = authorize(&h.engine, "app").accepted().unwrap().token;
    h.engine.swap_policies(refusing(&["web"]));
    let d = exchange(&h.engine, &code, "app");
    assert_eq!(d.deny_reason(), Some(DenyReason::UnknownClient));

    // The code was not spent: listed again, it exchanges.
    h.engine.swap_policies(refusing(&["app"]));
    let a = exchange(&h.engine, &code, "app")
        .accepted()
        .unwrap()
        .clone();
    // A replay would revoke the family (RFC 6749 §4.1.2); refused, it does not.
    h.engine.swap_policies(refusing(&["web"]));
    let d = exchange(&h.engine, &code, "app");
    assert_eq!(d.deny_reason(), Some(DenyReason::UnknownClient));
    let record = h.engine.family_record(a.family).unwrap();
    assert_eq!(record.status(), Status::Active);
}

#[test]
fn a_refusing_shadow_candidate_counts_the_clients_it_would_refuse() {
    let h = Harness::with_set(set(&["app"], UnknownClients::Defaults));
    let t = issue(&h.engine, "other").accepted().unwrap().token;
    let mine = issue(&h.engine, "app").accepted().unwrap().token;
    h.engine.set_shadow(refusing(&["app"]));
    assert!(redeem(&h.engine, &t, "other").accepted().is_some());
    assert!(redeem(&h.engine, &mine, "app").accepted().is_some());
    let r = h.engine.shadow_report().unwrap();
    assert_eq!(r.count("other", "rotated", "unknown_client"), 1);
    assert_eq!(r.count("app", "rotated", "rotated"), 1);
    let _ = START;
}

// ---- policy files ----

fn load(files: &[(&str, &str)]) -> Result<PolicySet, Vec<String>> {
    let paths: Vec<_> = files
        .iter()
        .map(|(n, _)| Path::new("policies").join(n))
        .collect();
    let files: Vec<(&Path, &str)> = paths
        .iter()
        .zip(files)
        .map(|(p, (_, t))| (p.as_path(), *t))
        .collect();
    PolicySet::from_toml(&files).map_err(|e| e.to_strings())
}

#[test]
fn unknown_clients_is_set_at_the_top_of_a_file() {
    let app = "[clients.app]\n";
    let refuse = load(&[("a.toml", &format!("unknown_clients = \"refuse\"\n{app}"))]).unwrap();
    let served = load(&[("a.toml", &format!("unknown_clients = \"defaults\"\n{app}"))]).unwrap();
    let unset = load(&[("a.toml", app)]).unwrap();
    assert_eq!(refuse.unknown_clients(), UnknownClients::Refuse);
    assert!(refuse.admits_client("app") && !refuse.admits_client("other"));
    assert_eq!(unset.unknown_clients(), UnknownClients::Defaults);
    assert!(unset.admits_client("other"));
    // It decides, so it is part of the version; writing the default out
    // changes nothing.
    assert_ne!(refuse.version(), unset.version());
    assert_eq!(served.version(), unset.version());
}

/// The version of a set without the setting is what it was before the
/// setting existed: stores and events carry versions across upgrades.
#[test]
fn sets_without_unknown_clients_keep_their_version() {
    assert_eq!(PolicySet::default().version().to_string(), "a39491a5d350");
}

#[test]
fn a_misplaced_or_bad_unknown_clients_is_refused_with_its_place() {
    let e = load(&[("a.toml", "[defaults]\nunknown_clients = \"refuse\"\n")]).unwrap_err();
    assert_eq!(
        e,
        [
            "policies/a.toml:2:1: defaults.unknown_clients: unknown_clients is set for the \
          whole set, not per table: write it at the top of a file, before any [table]"
        ]
    );
    let e = load(&[("a.toml", "unknown_clients = \"refused\"\n")]).unwrap_err();
    assert_eq!(
        e,
        [
            "policies/a.toml:1:19: unknown_clients: \"refused\" is not allowed; \
          use one of \"defaults\", \"refuse\" (did you mean \"refuse\"?)"
        ]
    );
    let e = load(&[
        ("a.toml", "unknown_clients = \"refuse\"\n"),
        ("b.toml", "\nunknown_clients = \"refuse\"\n"),
    ])
    .unwrap_err();
    assert_eq!(
        e,
        [
            "policies/b.toml:2:1: unknown_clients: also set in policies/a.toml:1:1; \
          unknown_clients may be set in one file only"
        ]
    );
    let e = load(&[("a.toml", "unknown_client = \"refuse\"\n")]).unwrap_err();
    assert_eq!(
        e,
        [
            "policies/a.toml:1:1: unknown_client: unknown setting `unknown_client`; \
          did you mean `unknown_clients`?"
        ]
    );
}
