//! PKCE-bound authorization codes (RFC 7636) as generation 0 of a family.

mod common;

use std::sync::{Arc, Barrier, Mutex, OnceLock, Weak};
use std::time::Duration;

use common::{CLIENT, Harness, START, ip};
use refresh_guard::RedeemRequest;
use refresh_guard::{
    AcceptKind, AuthorizeRequest, Decision, DenyReason, Engine, Event, EventKind, EventSink,
    ExchangeRequest, Generation, IpCheck, Pkce, PolicyOverrides, PolicySet, RevokeReason,
    Timestamp, Token,
};

const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
const REDIRECT: &str = "https://app.example/callback";

fn authorize(h: &Harness, challenge: Option<&str>, method: Option<&str>) -> Decision {
    h.engine
        .authorize(&AuthorizeRequest {
            client: CLIENT,
            subject: "alice",
            scope: "openid offline_access",
            redirect_uri: REDIRECT,
            code_challenge: challenge,
            code_challenge_method: method,
            ip: Some(ip("203.0.113.5")),
            dpop_jkt: None,
        })
        .unwrap()
}

fn code(h: &Harness) -> Token {
    let d = authorize(h, Some(CHALLENGE), Some("S256"));
    let a = d.accepted().expect("code issued");
    assert_eq!(a.kind, AcceptKind::CodeIssued);
    assert_eq!(a.generation, Generation::CODE);
    assert!(a.token.starts_with("rgc_"));
    a.token
}

fn exchange(h: &Harness, code: &str, verifier: Option<&str>) -> Decision {
    h.engine
        .exchange(&ExchangeRequest {
            code,
            code_verifier: verifier,
            client: CLIENT,
            redirect_uri: REDIRECT,
            ip: Some(ip("10.0.0.1")),
            dpop: None,
        })
        .unwrap()
}

fn reason(d: Decision) -> DenyReason {
    d.deny_reason().expect("denied")
}

/// The RFC 7636 Appendix B verifier/challenge pair exchanges for generation 1,
/// which then refreshes like any family.
#[test]
fn rfc7636_appendix_b_exchange() {
    let h = Harness::new(PolicyOverrides::new());
    let c = code(&h);
    let d = exchange(&h, &c, Some(VERIFIER));
    let a = d.accepted().unwrap().clone();
    assert_eq!(a.kind, AcceptKind::Exchanged);
    assert_eq!(a.generation, Generation::FIRST);
    assert!(a.token.starts_with("rgt_"));
    let r = h
        .engine
        .redeem(&RedeemRequest::new(&a.token, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(r.accepted().unwrap().generation, Generation::new(2));
}

/// `pkce = "s256"` refuses, at authorize time, a missing challenge and `plain`.
#[test]
fn s256_policy_refuses_at_authorize() {
    let h = Harness::new(PolicyOverrides::new().pkce(Pkce::S256));
    assert_eq!(reason(authorize(&h, None, None)), DenyReason::PkceRequired);
    assert_eq!(
        reason(authorize(&h, Some(VERIFIER), Some("plain"))),
        DenyReason::PkceMethodNotAllowed
    );
    assert_eq!(
        reason(authorize(&h, Some(VERIFIER), None)),
        DenyReason::PkceMethodNotAllowed,
        "absent method means plain"
    );
    assert_eq!(
        reason(authorize(&h, Some("abc"), Some("S256"))),
        DenyReason::PkceChallengeInvalid
    );
    assert_eq!(
        DenyReason::PkceChallengeInvalid.oauth_error().as_str(),
        "invalid_request"
    );
    assert_eq!(h.engine.stats().families, 0, "refusals create nothing");
}

/// A malformed or forged code is `invalid_token` and changes nothing.
#[test]
fn malformed_and_forged_codes_are_invalid() {
    let h = Harness::new(PolicyOverrides::new());
    let c = code(&h);
    assert_eq!(
        reason(exchange(&h, "rgc_nope", Some(VERIFIER))),
        DenyReason::InvalidToken
    );
    let as_refresh = format!("rgt_{}", &c[4..]);
    assert_eq!(
        reason(exchange(&h, &as_refresh, Some(VERIFIER))),
        DenyReason::InvalidToken
    );
    let mut forged = c.as_str().to_owned();
    forged.replace_range(30..31, if &forged[30..31] == "A" { "B" } else { "A" });
    assert_eq!(
        reason(exchange(&h, &forged, Some(VERIFIER))),
        DenyReason::InvalidToken
    );
    // The real code still works: nothing was burned.
    assert!(exchange(&h, &c, Some(VERIFIER)).accepted().is_some());
}

/// A code presented by another client is `client_mismatch`.
#[test]
fn code_of_another_client_is_refused() {
    let h = Harness::new(PolicyOverrides::new());
    let c = code(&h);
    let d = h
        .engine
        .exchange(&ExchangeRequest {
            code: &c,
            code_verifier: Some(VERIFIER),
            client: "other",
            redirect_uri: REDIRECT,
            ip: Some(ip("10.0.0.1")),
            dpop: None,
        })
        .unwrap();
    assert_eq!(reason(d), DenyReason::ClientMismatch);
    assert!(exchange(&h, &c, Some(VERIFIER)).accepted().is_some());
}

/// The redirect URI must be identical to the authorization request's.
#[test]
fn redirect_uri_must_match() {
    let h = Harness::new(PolicyOverrides::new());
    let c = code(&h);
    let d = h
        .engine
        .exchange(&ExchangeRequest {
            code: &c,
            code_verifier: Some(VERIFIER),
            client: CLIENT,
            redirect_uri: "https://app.example/callback/",
            ip: Some(ip("10.0.0.1")),
            dpop: None,
        })
        .unwrap();
    assert_eq!(reason(d), DenyReason::RedirectUriMismatch);
}

/// Codes live `code_ttl`.
#[test]
fn expired_code_is_refused() {
    let h = Harness::new(PolicyOverrides::new().code_ttl(Duration::from_secs(30)));
    let c = code(&h);
    h.advance(30);
    assert_eq!(
        reason(exchange(&h, &c, Some(VERIFIER))),
        DenyReason::CodeExpired
    );
}

/// PKCE at the exchange: missing, malformed and wrong verifiers.
#[test]
fn verifier_checks() {
    let h = Harness::new(PolicyOverrides::new());
    let c = code(&h);
    assert_eq!(reason(exchange(&h, &c, None)), DenyReason::PkceRequired);
    assert_eq!(
        reason(exchange(&h, &c, Some("short"))),
        DenyReason::PkceVerifierInvalid
    );
    let bad = format!("{}+", &VERIFIER[..43]);
    assert_eq!(
        reason(exchange(&h, &c, Some(&bad))),
        DenyReason::PkceVerifierInvalid
    );
    let wrong = VERIFIER.replace('d', "e");
    assert_eq!(
        reason(exchange(&h, &c, Some(&wrong))),
        DenyReason::PkceMismatch
    );
    assert!(exchange(&h, &c, Some(VERIFIER)).accepted().is_some());
}

/// `s256_or_plain` accepts plain; `optional` accepts a code without a
/// challenge but refuses a verifier for it (downgrade).
#[test]
fn plain_and_optional_policies() {
    let h = Harness::new(PolicyOverrides::new().pkce(Pkce::S256OrPlain));
    let c = authorize(&h, Some(VERIFIER), Some("plain"))
        .accepted()
        .unwrap()
        .token;
    assert_eq!(
        reason(exchange(&h, &c, Some(&VERIFIER.replace('d', "e")))),
        DenyReason::PkceMismatch
    );
    assert!(exchange(&h, &c, Some(VERIFIER)).accepted().is_some());
    assert_eq!(reason(authorize(&h, None, None)), DenyReason::PkceRequired);

    let h = Harness::new(PolicyOverrides::new().pkce(Pkce::Optional));
    let c = authorize(&h, None, None).accepted().unwrap().token;
    assert_eq!(
        reason(exchange(&h, &c, Some(VERIFIER))),
        DenyReason::PkceVerifierUnexpected
    );
    assert!(exchange(&h, &c, None).accepted().is_some());
    // A code issued with a challenge always needs the verifier, even under `optional`.
    let c = code(&h);
    assert_eq!(reason(exchange(&h, &c, None)), DenyReason::PkceRequired);
}

/// The allow-list applies at the exchange in both `ip_check` modes.
#[test]
fn allow_list_applies_at_exchange_in_both_modes() {
    for mode in [IpCheck::EveryRefresh, IpCheck::IssuanceOnly] {
        let h = Harness::new(
            PolicyOverrides::new()
                .ip_allowlist(vec!["192.0.2.0/24".parse().unwrap()])
                .ip_check(mode),
        );
        let c = code(&h);
        assert_eq!(
            reason(exchange(&h, &c, Some(VERIFIER))),
            DenyReason::IpNotAllowed
        );
        let d = h
            .engine
            .exchange(&ExchangeRequest {
                code: &c,
                code_verifier: Some(VERIFIER),
                client: CLIENT,
                redirect_uri: REDIRECT,
                ip: Some(ip("192.0.2.10")),
                dpop: None,
            })
            .unwrap();
        assert!(d.accepted().is_some(), "{mode:?}");
    }
}

/// A second exchange by the code's client, with its redirect URI and
/// verifier, within the code's lifetime is `code_reused`, revokes the family
/// born from the code (its refresh token dies) and emits an event saying so.
#[test]
fn code_replay_revokes_the_family() {
    let h = Harness::new(PolicyOverrides::new());
    let c = code(&h);
    let rt = exchange(&h, &c, Some(VERIFIER)).accepted().unwrap().token;
    h.sink.take();
    assert_eq!(
        reason(exchange(&h, &c, Some(VERIFIER))),
        DenyReason::CodeReused
    );
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&rt, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked)
    );
    let ev = h.sink.take();
    let kinds: Vec<_> = ev.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            EventKind::CodeReplay { revoked: true },
            EventKind::FamilyRevoked {
                reason: RevokeReason::CodeReplay
            }
        ]
    );
    assert_eq!(ev[0].ip, Some(ip("10.0.0.1")));
    // Further replays: the family is revoked.
    assert_eq!(
        reason(exchange(&h, &c, Some(VERIFIER))),
        DenyReason::Revoked
    );
}

/// A sink that swaps in another policy set when it sees a code replay:
/// the swap lands exactly between the replay's decision and its
/// revocation's `family_revoked` event.
struct SwapOnReplay {
    engine: OnceLock<Weak<Engine>>,
    events: Mutex<Vec<Event>>,
}

impl EventSink for SwapOnReplay {
    fn emit(&self, event: &Event) {
        self.events.lock().unwrap().push(event.clone());
        if let EventKind::CodeReplay { .. } = event.kind
            && let Some(engine) = self.engine.get().and_then(Weak::upgrade)
        {
            let other = PolicySet::builder()
                .client(
                    CLIENT,
                    PolicyOverrides::new().grace_period(Duration::from_secs(1)),
                )
                .build()
                .unwrap();
            engine.swap_policies(other);
        }
    }
}

/// Regression: a code replay's `family_revoked` event named the policy set
/// in force when the revocation was finished, not the one that decided the
/// replay (a reuse's names the deciding one), so a swap in between made
/// the two events of one replay disagree.
#[test]
fn a_code_replays_events_name_the_policy_version_that_decided_it() {
    let sink = Arc::new(SwapOnReplay {
        engine: OnceLock::new(),
        events: Mutex::new(Vec::new()),
    });
    let set = PolicySet::builder()
        .client(CLIENT, PolicyOverrides::new())
        .build()
        .unwrap();
    let deciding = set.version();
    let engine = Arc::new(
        Engine::builder()
            .policies(set)
            .events(sink.clone())
            .build()
            .unwrap(),
    );
    assert!(sink.engine.set(Arc::downgrade(&engine)).is_ok());
    let exchange_code = |code: &str| {
        engine
            .exchange(&ExchangeRequest {
                code,
                code_verifier: Some(VERIFIER),
                client: CLIENT,
                redirect_uri: REDIRECT,
                ip: Some(ip("10.0.0.1")),
                dpop: None,
            })
            .unwrap()
    };
    let c = engine
        .authorize(&AuthorizeRequest {
            client: CLIENT,
            subject: "alice",
            scope: "openid",
            redirect_uri: REDIRECT,
            code_challenge: Some(CHALLENGE),
            code_challenge_method: Some("S256"),
            ip: None,
            dpop_jkt: None,
        })
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    assert!(exchange_code(&c).accepted().is_some());
    let replay = exchange_code(&c);
    assert_eq!(replay.deny_reason(), Some(DenyReason::CodeReused));
    assert_eq!(replay.policy_version(), deciding);
    assert_ne!(engine.policies().version(), deciding, "the sink swapped");
    let events = sink.events.lock().unwrap();
    let of_replay: Vec<_> = events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::CodeReplay { .. } | EventKind::FamilyRevoked { .. }
            )
        })
        .map(|e| (e.kind.as_str(), e.policy_version))
        .collect();
    assert_eq!(
        of_replay,
        [("code_replay", deciding), ("family_revoked", deciding)]
    );
}

/// N threads exchanging one code at once: exactly one family is created (one
/// exchange succeeds) and the replays then revoke it.
#[test]
fn racing_exchanges_create_one_family_then_revoke_it() {
    const THREADS: usize = 8;
    let h = Harness::new(PolicyOverrides::new());
    for _ in 0..300 {
        let c = code(&h);
        let barrier = Barrier::new(THREADS);
        let out: Vec<Decision> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        exchange(&h, &c, Some(VERIFIER))
                    })
                })
                .collect();
            hs.into_iter().map(|j| j.join().unwrap()).collect()
        });
        let wins: Vec<_> = out.iter().filter_map(|d| d.accepted()).collect();
        assert_eq!(wins.len(), 1);
        let reasons: Vec<_> = out.iter().filter_map(|d| d.deny_reason()).collect();
        assert_eq!(
            reasons
                .iter()
                .filter(|r| **r == DenyReason::CodeReused)
                .count(),
            1,
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .all(|r| matches!(r, DenyReason::CodeReused | DenyReason::Revoked))
        );
        assert_eq!(
            h.engine
                .redeem(&RedeemRequest::new(&wins[0].token, CLIENT).ip(ip("10.0.0.1")))
                .unwrap()
                .deny_reason(),
            Some(DenyReason::Revoked)
        );
    }
}

/// Unused codes expire and are swept: memory stays bounded.
#[test]
fn unused_codes_are_swept() {
    let h = Harness::new(PolicyOverrides::new().code_ttl(Duration::from_secs(60)));
    for _ in 0..100 {
        code(&h);
    }
    assert_eq!(h.engine.stats().families, 100);
    h.advance(59);
    h.engine.sweep(100_000).unwrap();
    assert_eq!(h.engine.stats().families, 100);
    h.advance(1);
    h.engine.sweep(100_000).unwrap();
    assert_eq!(h.engine.stats().families, 0);
}

/// The absolute lifetime counts from the exchange, not the authorization.
#[test]
fn absolute_lifetime_starts_at_exchange() {
    let h = Harness::new(
        PolicyOverrides::new()
            .code_ttl(Duration::from_secs(600))
            .absolute_ttl(Some(Duration::from_secs(1000))),
    );
    let c = code(&h);
    h.advance(500);
    let rt = exchange(&h, &c, Some(VERIFIER)).accepted().unwrap().token;
    // 1400 s after the code, 900 s after the exchange: alive.
    h.advance(900);
    let rt = h
        .engine
        .redeem(&RedeemRequest::new(&rt, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    // 1000 s after the exchange: over, though used a moment ago.
    h.advance(100);
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&rt, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::ExpiredAbsolute)
    );
}

/// Neither a plain challenge (it is the verifier) nor a verifier nor a code
/// appears in `Debug` output.
#[test]
fn requests_debug_without_secrets() {
    let a = AuthorizeRequest {
        client: CLIENT,
        subject: "alice",
        scope: "openid",
        redirect_uri: REDIRECT,
        code_challenge: Some(VERIFIER),
        code_challenge_method: Some("plain"),
        ip: Some(ip("10.0.0.1")),
        dpop_jkt: None,
    };
    let x = ExchangeRequest {
        code: "rgc_secretcode",
        code_verifier: Some(VERIFIER),
        client: CLIENT,
        redirect_uri: REDIRECT,
        ip: Some(ip("10.0.0.1")),
        dpop: None,
    };
    let d = format!("{a:?} {x:?}");
    assert!(!d.contains(VERIFIER), "{d}");
    assert!(!d.contains("secretcode"), "{d}");
}

/// An exchange of `code` by `client` to `redirect_uri` at `now`.
fn exchange_by(
    h: &Harness,
    code: &str,
    client: &str,
    redirect_uri: &str,
    verifier: Option<&str>,
    now: Timestamp,
) -> Decision {
    h.engine
        .at(now)
        .exchange(&ExchangeRequest {
            code,
            code_verifier: verifier,
            client,
            redirect_uri,
            ip: Some(ip("10.0.0.1")),
            dpop: None,
        })
        .unwrap()
}

/// A code issued at `START`, exchanged at once: the code and the first
/// refresh token.
fn exchanged(h: &Harness) -> (Token, Token) {
    let c = code(h);
    let rt = exchange_by(h, &c, CLIENT, REDIRECT, Some(VERIFIER), START)
        .accepted()
        .expect("exchanged")
        .token;
    h.sink.take();
    (c, rt)
}

/// The family is alive: its refresh token still rotates.
fn assert_redeemable(h: &Harness, rt: &str) {
    let d = h
        .engine
        .redeem(&RedeemRequest::new(rt, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(
        d.accepted().map(|a| a.kind),
        Some(AcceptKind::Rotated),
        "{d:?}"
    );
}

/// The only event is a code replay that revoked nothing.
fn assert_replay_revoked_nothing(h: &Harness) {
    let kinds: Vec<_> = h.sink.take().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::CodeReplay { revoked: false }]);
}

/// Regression: a replayed code revoked its family without a verifier, so
/// anyone holding a leaked code (URL, Referer, log) could log the user out.
/// A replay with a missing, malformed or wrong verifier is now a plain
/// `code_spent` denial and the family stays redeemable.
#[test]
fn replay_without_the_verifier_revokes_nothing() {
    let h = Harness::new(PolicyOverrides::new());
    let (c, rt) = exchanged(&h);
    let wrong = VERIFIER.replace('d', "e");
    for verifier in [None, Some("short"), Some(wrong.as_str())] {
        let d = exchange_by(&h, &c, CLIENT, REDIRECT, verifier, START);
        assert_eq!(reason(d), DenyReason::CodeSpent, "{verifier:?}");
        assert_replay_revoked_nothing(&h);
    }
    assert_redeemable(&h, &rt);
    assert_eq!(
        DenyReason::CodeSpent.description(),
        "authorization code was already used",
        "says nothing was revoked"
    );
}

/// Regression: a replay to another redirect URI revoked the family; it
/// would have failed the exchange (RFC 6749 §4.1.3), so it is now a plain
/// `code_spent` denial.
#[test]
fn replay_to_another_redirect_uri_revokes_nothing() {
    let h = Harness::new(PolicyOverrides::new());
    let (c, rt) = exchanged(&h);
    let d = exchange_by(
        &h,
        &c,
        CLIENT,
        "https://app.example/callback/",
        Some(VERIFIER),
        START,
    );
    assert_eq!(reason(d), DenyReason::CodeSpent);
    assert_replay_revoked_nothing(&h);
    assert_redeemable(&h, &rt);
}

/// A replay by another client is `client_mismatch`, checked first as for
/// every token (README "The order of checks"): no revocation.
#[test]
fn replay_by_another_client_revokes_nothing() {
    let h = Harness::new(PolicyOverrides::new());
    let (c, rt) = exchanged(&h);
    let d = exchange_by(&h, &c, "other", REDIRECT, Some(VERIFIER), START);
    assert_eq!(reason(d), DenyReason::ClientMismatch);
    let kinds: Vec<_> = h.sink.take().into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EventKind::ClientMismatch {
            presented_client: "other".into()
        }]
    );
    assert_redeemable(&h, &rt);
}

/// Regression: a replay revoked the family however old the code was.
/// Once the code's lifetime (`code_ttl`, counted from its issue, not from
/// the exchange) is over, even a replay passing every other check is a
/// plain `code_spent` denial; one millisecond before, it revokes.
#[test]
fn replay_after_the_code_lifetime_revokes_nothing() {
    let ttl = Duration::from_secs(60);
    let h = Harness::new(PolicyOverrides::new().code_ttl(ttl));
    let c = code(&h);
    // Exchanged late in the code's life: the lifetime still ends at
    // issue + ttl.
    let exchanged_at = Timestamp::from_millis(START.as_millis() + 50_000);
    let rt = exchange_by(&h, &c, CLIENT, REDIRECT, Some(VERIFIER), exchanged_at)
        .accepted()
        .expect("exchanged")
        .token;
    h.sink.take();
    let end = START.saturating_add(ttl);
    let d = exchange_by(&h, &c, CLIENT, REDIRECT, Some(VERIFIER), end);
    assert_eq!(reason(d), DenyReason::CodeSpent);
    assert_replay_revoked_nothing(&h);
    assert_redeemable(&h, &rt);

    // The same replay inside the lifetime revokes.
    let h = Harness::new(PolicyOverrides::new().code_ttl(ttl));
    let c = code(&h);
    let rt = exchange_by(&h, &c, CLIENT, REDIRECT, Some(VERIFIER), exchanged_at)
        .accepted()
        .expect("exchanged")
        .token;
    let just_before = Timestamp::from_millis(end.as_millis() - 1);
    let d = exchange_by(&h, &c, CLIENT, REDIRECT, Some(VERIFIER), just_before);
    assert_eq!(reason(d), DenyReason::CodeReused);
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&rt, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked)
    );
}

/// A replay is held to the policy in force when it comes, and the state
/// it is judged against survives sweeps within the code's lifetime.
#[test]
fn replay_is_judged_by_the_policy_in_force_and_survives_sweeps() {
    let h = Harness::new(PolicyOverrides::new().code_ttl(Duration::from_secs(30)));
    let (c, rt) = exchanged(&h);
    h.advance(40);
    h.engine.sweep(100_000).unwrap();
    let replay = || exchange_by(&h, &c, CLIENT, REDIRECT, Some(VERIFIER), h.engine.now());
    assert_eq!(reason(replay()), DenyReason::CodeSpent);
    // A longer `code_ttl` swapped in: the code is inside its lifetime again.
    set_policy(
        &h,
        PolicyOverrides::new().code_ttl(Duration::from_secs(600)),
    );
    h.sink.take();
    assert_eq!(reason(replay()), DenyReason::CodeReused);
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&rt, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked)
    );
}

/// Past the longest possible code lifetime the sweeper drops the state, and
/// a replay is a plain denial as before (dropping it decides nothing).
#[test]
fn replay_after_the_state_is_dropped_revokes_nothing() {
    let h = Harness::new(PolicyOverrides::new().code_ttl(Duration::from_secs(600)));
    let (c, rt) = exchanged(&h);
    h.advance(600);
    h.engine.sweep(100_000).unwrap();
    let d = exchange_by(&h, &c, CLIENT, REDIRECT, Some(VERIFIER), h.engine.now());
    assert_eq!(reason(d), DenyReason::CodeSpent);
    assert_replay_revoked_nothing(&h);
    assert_redeemable(&h, &rt);
}

fn set_policy(h: &Harness, client: PolicyOverrides) {
    h.engine
        .swap_policies(PolicySet::builder().client(CLIENT, client).build().unwrap());
}

/// Mutation guard: under `pkce = "s256_or_plain"` a code needs a
/// challenge. Without one it is refused at authorize (`pkce_required`,
/// nothing created); one issued under `optional` before a swap is refused
/// at the exchange (`pkce_required`, or `pkce_verifier_unexpected` with a
/// verifier: a downgrade) and stays exchangeable once `optional` is back;
/// and a replay of an exchanged one does not pass the checks, so it revokes
/// nothing, while the same replay under `optional` does.
#[test]
fn no_challenge_code_is_refused_under_s256_or_plain() {
    let h = Harness::new(PolicyOverrides::new().pkce(Pkce::S256OrPlain));
    assert_eq!(reason(authorize(&h, None, None)), DenyReason::PkceRequired);
    assert_eq!(h.engine.stats().families, 0);

    set_policy(&h, PolicyOverrides::new().pkce(Pkce::Optional));
    let pending = authorize(&h, None, None).accepted().unwrap().token;
    let spent = authorize(&h, None, None).accepted().unwrap().token;
    let rt = exchange(&h, &spent, None).accepted().unwrap().token;

    set_policy(&h, PolicyOverrides::new().pkce(Pkce::S256OrPlain));
    assert_eq!(
        reason(exchange(&h, &pending, None)),
        DenyReason::PkceRequired
    );
    assert_eq!(
        reason(exchange(&h, &pending, Some(VERIFIER))),
        DenyReason::PkceVerifierUnexpected
    );
    h.sink.take();
    assert_eq!(reason(exchange(&h, &spent, None)), DenyReason::CodeSpent);
    assert_replay_revoked_nothing(&h);
    assert_redeemable(&h, &rt);

    set_policy(&h, PolicyOverrides::new().pkce(Pkce::Optional));
    assert!(exchange(&h, &pending, None).accepted().is_some());
    assert_eq!(reason(exchange(&h, &spent, None)), DenyReason::CodeReused);
}

/// The state a replay is judged against is persisted with the family, also
/// through a compaction: after a restart within the code's lifetime a
/// replay with the verifier still revokes, and one without still does not.
#[cfg(feature = "durable")]
#[test]
fn replay_is_judged_the_same_after_a_restart() {
    use std::sync::Arc;

    use refresh_guard::{Engine, KeyId, KeyRing, KeySecret, LogOptions, LogStore, ManualClock};

    let dir = tempfile::tempdir().unwrap();
    let open = || {
        Engine::builder()
            .keys(KeyRing::new(KeyId(1), &KeySecret::from_bytes([7; 32])))
            .clock(Arc::new(ManualClock::new(START)))
            // A directory the store creates itself: private (0700).
            .store(LogStore::open(dir.path().join("log"), LogOptions::default()).unwrap())
            .build()
            .unwrap()
    };
    let exchange = |e: &Engine, code: &str, verifier| {
        e.exchange(&ExchangeRequest {
            code,
            code_verifier: verifier,
            client: CLIENT,
            redirect_uri: REDIRECT,
            ip: Some(ip("10.0.0.1")),
            dpop: None,
        })
        .unwrap()
    };
    let (code, rt) = {
        let e = open();
        let code = e
            .authorize(&AuthorizeRequest {
                client: CLIENT,
                subject: "alice",
                scope: "openid",
                redirect_uri: REDIRECT,
                code_challenge: Some(CHALLENGE),
                code_challenge_method: Some("S256"),
                ip: Some(ip("10.0.0.1")),
                dpop_jkt: None,
            })
            .unwrap()
            .accepted()
            .unwrap()
            .token;
        let rt = exchange(&e, &code, Some(VERIFIER))
            .accepted()
            .unwrap()
            .token;
        e.compact().unwrap();
        e.flush().unwrap();
        (code, rt)
    };
    let e = open();
    assert_eq!(reason(exchange(&e, &code, None)), DenyReason::CodeSpent);
    assert!(e.introspect(&rt).is_some_and(|i| i.active));
    assert_eq!(
        reason(exchange(&e, &code, Some(VERIFIER))),
        DenyReason::CodeReused
    );
    drop(e);
    let e = open();
    assert!(e.introspect(&rt).is_some_and(|i| !i.active));
}

/// The allow-list is not one of the checks a revoking replay must pass: a
/// replay proving the verifier from a foreign network is theft, as a
/// rotated-out refresh token from one is (README "The order of checks").
#[test]
fn replay_with_the_verifier_from_outside_the_allow_list_revokes() {
    let h = Harness::new(PolicyOverrides::new().ip_allowlist(vec!["10.0.0.0/8".parse().unwrap()]));
    let (c, rt) = exchanged(&h);
    let d = h
        .engine
        .exchange(&ExchangeRequest {
            code: &c,
            code_verifier: Some(VERIFIER),
            client: CLIENT,
            redirect_uri: REDIRECT,
            ip: Some(ip("198.51.100.7")),
            dpop: None,
        })
        .unwrap();
    assert_eq!(reason(d), DenyReason::CodeReused);
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&rt, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked)
    );
}
