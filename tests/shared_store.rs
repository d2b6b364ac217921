//! Several engines on one Redis (README "Several instances"): whichever
//! engine answers, the answer is one engine's, per the README's order of
//! checks. Each test starts its own redis-server (tests/redis_support).
#![cfg(feature = "redis")]

mod redis_support;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use redis_support::RedisServer;
use refresh_guard::{
    AcceptKind, AuthorizeRequest, DenyReason, Engine, EventKind, ExchangeRequest, IssueRequest,
    KeyId, KeyRing, KeySecret, MemorySink, OnReuse, OnRollback, PolicyOverrides, PolicySet,
    RedeemRequest, RedisOptions, RedisStore, RevokeReason, Timestamp, Token,
};

const CLIENT: &str = "mobile-app";
const T0: Timestamp = Timestamp::from_secs(1_700_000_000);

fn at(secs: u64) -> Timestamp {
    T0.saturating_add(Duration::from_secs(secs))
}

fn ip() -> Option<IpAddr> {
    Some("10.0.0.1".parse().unwrap())
}

/// Engines sharing one Redis, one key ring and one policy set, each with
/// its own cache and event sink.
struct Cluster {
    server: RedisServer,
    engines: Vec<Engine>,
    sinks: Vec<Arc<MemorySink>>,
}

fn options() -> RedisOptions {
    let mut o = RedisOptions::default();
    // The tests drive the engines' time by hand (`engine.at`).
    o.key_ttl = None;
    o
}

impl Cluster {
    fn new(n: usize, policy: PolicyOverrides) -> Cluster {
        Cluster::with(RedisServer::start(), n, policy, options())
    }

    fn with(server: RedisServer, n: usize, policy: PolicyOverrides, o: RedisOptions) -> Cluster {
        let keys = KeyRing::new(KeyId(1), &KeySecret::generate().unwrap());
        let set = || {
            PolicySet::builder()
                .client(CLIENT, policy.clone())
                .build()
                .unwrap()
        };
        let mut engines = Vec::new();
        let mut sinks = Vec::new();
        for _ in 0..n {
            let sink = Arc::new(MemorySink::new());
            let store = RedisStore::connect(&server.url(), o.clone()).unwrap();
            engines.push(
                Engine::builder()
                    .keys(keys.clone())
                    .policies(set())
                    .events(sink.clone())
                    .shared_store(store)
                    .build()
                    .unwrap(),
            );
            sinks.push(sink);
        }
        Cluster {
            server,
            engines,
            sinks,
        }
    }

    fn issue(&self, e: usize, subject: &str, t: Timestamp) -> Token {
        self.engines[e]
            .at(t)
            .issue(&IssueRequest {
                client: CLIENT,
                subject,
                scope: "openid",
                ip: ip(),
            })
            .unwrap()
            .accepted()
            .expect("issued")
            .token
    }

    fn redeem(&self, e: usize, token: &Token, t: Timestamp) -> refresh_guard::Decision {
        self.engines[e]
            .at(t)
            .redeem(&RedeemRequest::new(token.as_str(), CLIENT).ip(ip()))
            .unwrap()
    }

    fn events(&self, e: usize) -> Vec<EventKind> {
        self.sinks[e].take().into_iter().map(|ev| ev.kind).collect()
    }
}

fn token_of(d: &refresh_guard::Decision) -> Token {
    d.accepted().expect("accepted").token
}

fn kind_of(d: &refresh_guard::Decision) -> Option<AcceptKind> {
    d.accepted().map(|a| a.kind)
}

fn grace() -> PolicyOverrides {
    PolicyOverrides {
        grace_period: Some(Duration::from_secs(10)),
        grace_max_replays: Some(3),
        ..PolicyOverrides::default()
    }
}

#[test]
fn a_family_issued_on_one_engine_rotates_on_every_other() {
    let c = Cluster::new(3, PolicyOverrides::default());
    let t1 = c.issue(0, "alice", at(0));
    let t2 = token_of(&c.redeem(1, &t1, at(1)));
    let t3 = token_of(&c.redeem(2, &t2, at(2)));
    let t4 = token_of(&c.redeem(0, &t3, at(3)));
    assert_eq!(kind_of(&c.redeem(1, &t4, at(4))), Some(AcceptKind::Rotated));
    let seen = c.engines[2].at(at(4)).introspect(t4.as_str()).unwrap();
    assert!(!seen.active, "t4 was rotated on engine 1");
    assert_eq!(seen.current_generation.get(), 5);
}

#[test]
fn a_token_rotated_on_one_engine_is_reuse_on_another() {
    let c = Cluster::new(2, PolicyOverrides::default());
    let t1 = c.issue(0, "alice", at(0));
    // B caches the family at generation 1.
    assert!(
        c.engines[1]
            .at(at(0))
            .introspect(t1.as_str())
            .unwrap()
            .active
    );
    let t2 = token_of(&c.redeem(0, &t1, at(1)));
    // B's cache still says t1 is current: the store says it is not.
    let replay = c.redeem(1, &t1, at(2));
    assert_eq!(replay.deny_reason(), Some(DenyReason::ReuseDetected));
    assert_eq!(
        c.redeem(0, &t2, at(3)).deny_reason(),
        Some(DenyReason::Revoked),
        "on_reuse = revoke_family holds on the engine that rotated"
    );
    let events = c.events(1);
    assert!(
        matches!(events[0], EventKind::ReuseDetected { .. }),
        "{events:?}"
    );
    assert_eq!(
        events[1],
        EventKind::FamilyRevoked {
            reason: RevokeReason::ReuseDetected
        }
    );
}

#[test]
fn a_grace_replay_returns_the_same_successor_whichever_engine_answers() {
    let c = Cluster::new(3, grace());
    let t1 = c.issue(0, "alice", at(0));
    let rotated = c.redeem(0, &t1, at(1));
    let t2 = token_of(&rotated);
    for e in [1, 2] {
        let replay = c.redeem(e, &t1, at(2));
        assert_eq!(kind_of(&replay), Some(AcceptKind::GraceReplay));
        assert_eq!(token_of(&replay), t2, "engine {e}");
    }
    // Three replays allowed; the fourth is reuse.
    assert_eq!(
        kind_of(&c.redeem(0, &t1, at(3))),
        Some(AcceptKind::GraceReplay)
    );
    assert_eq!(
        c.redeem(1, &t1, at(3)).deny_reason(),
        Some(DenyReason::ReuseDetected)
    );
}

#[test]
fn a_revocation_on_one_engine_is_seen_by_the_next_redemption_on_another() {
    let c = Cluster::new(2, PolicyOverrides::default());
    let t1 = c.issue(0, "alice", at(0));
    let t2 = token_of(&c.redeem(1, &t1, at(1)));
    assert!(
        c.engines[0]
            .at(at(2))
            .revoke_token(t2.as_str(), Some(CLIENT))
            .unwrap()
    );
    assert_eq!(
        c.redeem(1, &t2, at(3)).deny_reason(),
        Some(DenyReason::Revoked)
    );
    // By family id and by subject too.
    let u1 = c.issue(1, "bob", at(0));
    let id = c.engines[0]
        .at(at(0))
        .introspect(u1.as_str())
        .unwrap()
        .family;
    assert!(c.engines[0].at(at(1)).revoke_family(id).unwrap());
    assert_eq!(
        c.redeem(1, &u1, at(2)).deny_reason(),
        Some(DenyReason::Revoked)
    );
    let v1 = c.issue(0, "carol", at(0));
    let v2 = c.issue(1, "carol", at(0));
    assert_eq!(
        c.engines[1]
            .at(at(1))
            .revoke_subject("carol", None)
            .unwrap(),
        2
    );
    for v in [&v1, &v2] {
        assert_eq!(
            c.redeem(0, v, at(2)).deny_reason(),
            Some(DenyReason::Revoked)
        );
    }
    // And by client, across every family in the store.
    let w1 = c.issue(0, "dave", at(0));
    assert_eq!(c.engines[1].at(at(1)).revoke_client(CLIENT).unwrap(), 1);
    assert_eq!(
        c.redeem(0, &w1, at(2)).deny_reason(),
        Some(DenyReason::Revoked)
    );
}

#[test]
fn reuse_revokes_the_subjects_families_across_engines_per_on_reuse() {
    let c = Cluster::new(
        2,
        PolicyOverrides {
            on_reuse: Some(OnReuse::RevokeSubject),
            ..PolicyOverrides::default()
        },
    );
    let a1 = c.issue(0, "alice", at(0));
    let b1 = c.issue(1, "alice", at(0));
    let other = c.issue(1, "bob", at(0));
    let _a2 = token_of(&c.redeem(0, &a1, at(1)));
    assert_eq!(
        c.redeem(1, &a1, at(2)).deny_reason(),
        Some(DenyReason::ReuseDetected)
    );
    assert_eq!(
        c.redeem(0, &b1, at(3)).deny_reason(),
        Some(DenyReason::Revoked)
    );
    assert!(
        c.redeem(0, &other, at(3)).accepted().is_some(),
        "another subject"
    );
    let revoked: Vec<_> = c
        .events(1)
        .into_iter()
        .filter(|k| matches!(k, EventKind::FamilyRevoked { .. }))
        .collect();
    assert_eq!(
        revoked,
        vec![
            EventKind::FamilyRevoked {
                reason: RevokeReason::ReuseDetected
            },
            EventKind::FamilyRevoked {
                reason: RevokeReason::SubjectReuse
            },
        ]
    );
}

fn authorize(e: &Engine, t: Timestamp) -> Token {
    e.at(t)
        .authorize(&AuthorizeRequest {
            client: CLIENT,
            subject: "alice",
            scope: "openid",
            redirect_uri: "https://app.example/cb",
            code_challenge: Some("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"),
            code_challenge_method: Some("S256"),
            ip: ip(),
            dpop_jkt: None,
        })
        .unwrap()
        .accepted()
        .expect("code issued")
        .token
}

fn exchange(e: &Engine, code: &Token, t: Timestamp) -> refresh_guard::Decision {
    e.at(t)
        .exchange(&ExchangeRequest {
            code: code.as_str(),
            code_verifier: Some("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            client: CLIENT,
            redirect_uri: "https://app.example/cb",
            ip: ip(),
            dpop: None,
        })
        .unwrap()
}

#[test]
fn a_code_exchanged_on_one_engine_and_replayed_on_another_revokes_its_family() {
    let c = Cluster::new(2, PolicyOverrides::default());
    let code = authorize(&c.engines[0], at(0));
    let first = exchange(&c.engines[1], &code, at(1));
    assert_eq!(kind_of(&first), Some(AcceptKind::Exchanged));
    let t1 = token_of(&first);
    let replay = exchange(&c.engines[0], &code, at(2));
    assert_eq!(replay.deny_reason(), Some(DenyReason::CodeReused));
    assert_eq!(
        c.redeem(1, &t1, at(3)).deny_reason(),
        Some(DenyReason::Revoked)
    );
    assert!(
        c.events(0)
            .contains(&EventKind::CodeReplay { revoked: true })
    );
}

#[test]
fn the_family_cap_holds_across_engines() {
    let c = Cluster::new(
        3,
        PolicyOverrides {
            max_families_per_subject: Some(2),
            ..PolicyOverrides::default()
        },
    );
    let tokens: Vec<Token> = (0..5)
        .map(|i| c.issue(i % 3, "alice", at(i as u64)))
        .collect();
    let live: Vec<bool> = tokens
        .iter()
        .map(|t| {
            c.engines[0]
                .at(at(10))
                .introspect(t.as_str())
                .unwrap()
                .active
        })
        .collect();
    assert_eq!(
        live,
        [false, false, false, true, true],
        "the two newest stay"
    );
    let evictions: usize = (0..3)
        .map(|e| {
            c.events(e)
                .iter()
                .filter(|k| matches!(k, EventKind::CapEviction { cap: 2 }))
                .count()
        })
        .sum();
    assert_eq!(evictions, 3);
}

#[test]
fn a_forged_tag_of_a_cached_family_is_refused_without_the_network() {
    let mut c = Cluster::new(1, PolicyOverrides::default());
    let t1 = c.issue(0, "alice", at(0));
    // Flip one character of the tag (the token's last ones).
    let mut forged = t1.as_str().to_owned();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    c.server.kill();
    let denied = c.engines[0]
        .at(at(1))
        .redeem(&RedeemRequest::new(&forged, CLIENT).ip(ip()))
        .unwrap();
    assert_eq!(denied.deny_reason(), Some(DenyReason::InvalidToken));
    let malformed = c.engines[0]
        .at(at(1))
        .redeem(&RedeemRequest::new("rgt_nope", CLIENT).ip(ip()))
        .unwrap();
    assert_eq!(malformed.deny_reason(), Some(DenyReason::InvalidToken));
    // The genuine token needs the store's word: an error, not a guess.
    assert!(matches!(
        c.engines[0]
            .at(at(1))
            .redeem(&RedeemRequest::new(t1.as_str(), CLIENT).ip(ip())),
        Err(refresh_guard::Error::Store { .. })
    ));
}

#[test]
fn a_generation_ahead_of_the_store_rolls_forward_or_is_denied_per_option() {
    for (on_rollback, expect_accept) in [(OnRollback::RollForward, true), (OnRollback::Deny, false)]
    {
        let mut o = options();
        o.on_rollback = on_rollback;
        let c = Cluster::with(RedisServer::start(), 1, PolicyOverrides::default(), o);
        let t1 = c.issue(0, "alice", at(0));
        let id = c.engines[0]
            .at(at(0))
            .introspect(t1.as_str())
            .unwrap()
            .family;
        let before = c.engines[0].family_record(id).unwrap();
        let t2 = token_of(&c.redeem(0, &t1, at(1)));
        let t3 = token_of(&c.redeem(0, &t2, at(2)));
        // The store loses the last rotation (a failover's lost write).
        c.engines[0].restore_family(before).unwrap();
        let d = c.redeem(0, &t3, at(3));
        assert_eq!(
            d.accepted().is_some(),
            expect_accept,
            "{on_rollback:?}: {d:?}"
        );
        if !expect_accept {
            assert_eq!(d.deny_reason(), Some(DenyReason::StateRollback));
        } else {
            assert_eq!(d.accepted().unwrap().generation.get(), 4);
            // The rolled-forward record denies the lost generation's
            // predecessor as reuse.
            assert_eq!(
                c.redeem(0, &t2, at(4)).deny_reason(),
                Some(DenyReason::ReuseDetected)
            );
        }
        assert!(
            c.events(0)
                .iter()
                .any(|k| matches!(k, EventKind::StateRollback { .. })),
            "{on_rollback:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// A cache behind the store: engine B decides on an old record, the store's
// compare-and-set answers with the current one, B decides again.
// ---------------------------------------------------------------------------

/// Regression: a decision that changes nothing (a denial on expiry) must
/// still be confirmed against the store's version. B's cache says the
/// family has been idle past its TTL; A used it since; B must accept.
#[test]
fn a_stale_cache_that_says_idle_expired_is_confirmed_before_denying() {
    let c = Cluster::new(
        2,
        PolicyOverrides {
            rotation: Some(refresh_guard::Rotation::Reuse),
            idle_ttl: Some(Some(Duration::from_secs(100))),
            ..PolicyOverrides::default()
        },
    );
    let t1 = c.issue(0, "alice", at(0));
    // B caches the family, last used at 0.
    assert!(
        c.engines[1]
            .at(at(0))
            .introspect(t1.as_str())
            .unwrap()
            .active
    );
    // A uses it at 90: last use moves in the store, not in B's cache.
    assert_eq!(kind_of(&c.redeem(0, &t1, at(90))), Some(AcceptKind::Kept));
    // At 150 B's copy is idle-expired (0 + 100), the store's is not (90 + 100).
    assert_eq!(kind_of(&c.redeem(1, &t1, at(150))), Some(AcceptKind::Kept));
    // And past the store's idle TTL, B denies, with the store's word.
    assert_eq!(
        c.redeem(1, &t1, at(251)).deny_reason(),
        Some(DenyReason::ExpiredIdle)
    );
}

#[test]
fn a_stale_cache_redeeming_the_successor_catches_up_without_a_rollback() {
    let c = Cluster::new(2, PolicyOverrides::default());
    let t1 = c.issue(0, "alice", at(0));
    assert!(
        c.engines[1]
            .at(at(0))
            .introspect(t1.as_str())
            .unwrap()
            .active
    );
    let t2 = token_of(&c.redeem(0, &t1, at(1)));
    // B's cache is at generation 1: t2 looks ahead of it, but the store
    // is at 2. A plain rotation, no `state_rollback`.
    let d = c.redeem(1, &t2, at(2));
    assert_eq!(kind_of(&d), Some(AcceptKind::Rotated));
    assert_eq!(d.accepted().unwrap().generation.get(), 3);
    assert!(c.events(1).is_empty());
}

#[test]
fn a_stale_cache_replaying_in_grace_returns_the_successor_the_other_engine_minted() {
    let c = Cluster::new(2, grace());
    let t1 = c.issue(0, "alice", at(0));
    assert!(
        c.engines[1]
            .at(at(0))
            .introspect(t1.as_str())
            .unwrap()
            .active
    );
    let t2 = token_of(&c.redeem(0, &t1, at(1)));
    // B's cache says t1 is current and would rotate it (a fork).
    let replay = c.redeem(1, &t1, at(2));
    assert_eq!(kind_of(&replay), Some(AcceptKind::GraceReplay));
    assert_eq!(token_of(&replay), t2);
}

// ---------------------------------------------------------------------------
// Faults: bounded, fail closed, heal by themselves.
// ---------------------------------------------------------------------------

#[test]
fn an_unreachable_redis_is_a_store_error_and_the_engine_heals_when_it_returns() {
    let server = RedisServer::options().aof().start();
    let mut c = Cluster::with(server, 2, grace(), options());
    let t1 = c.issue(0, "alice", at(0));
    let t2 = token_of(&c.redeem(1, &t1, at(1)));
    c.server.kill();
    for e in 0..2 {
        let started = std::time::Instant::now();
        assert!(matches!(
            c.engines[e]
                .at(at(2))
                .redeem(&RedeemRequest::new(t2.as_str(), CLIENT).ip(ip())),
            Err(refresh_guard::Error::Store { .. })
        ));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let issued = c.engines[e].at(at(2)).issue(&IssueRequest {
            client: CLIENT,
            subject: "bob",
            scope: "openid",
            ip: ip(),
        });
        assert!(matches!(issued, Err(refresh_guard::Error::Store { .. })));
        assert!(c.engines[e].at(at(2)).introspect(t2.as_str()).is_none());
    }
    for e in &c.engines {
        assert!(e.store_failure().is_some(), "a health check sees the fault");
    }
    c.server.restart();
    // No restart of the engines, and no call needed: each reconnects by
    // itself, and its health check clears.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.engines.iter().any(|e| e.store_failure().is_some()) {
        assert!(
            std::time::Instant::now() < deadline,
            "not healed within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first call on each is served. The rotation acknowledged before
    // the kill survived it (AOF always).
    let d = c.redeem(0, &t2, at(3));
    assert_eq!(d.accepted().unwrap().generation.get(), 3);
    let t3 = token_of(&d);
    assert_eq!(kind_of(&c.redeem(1, &t3, at(4))), Some(AcceptKind::Rotated));
}

/// A Redis that accepts connections and never answers: every call is a
/// store error within the bound, none hangs.
#[test]
fn a_redis_that_never_answers_is_a_store_error_within_the_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let started = std::time::Instant::now();
    let connected = RedisStore::connect(&format!("redis://127.0.0.1:{port}/"), options());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Connecting may succeed (nothing to ask yet) or time out; a command
    // must time out.
    if let Ok(store) = connected {
        let engine = Engine::builder().shared_store(store).build().unwrap();
        let started = std::time::Instant::now();
        let issued = engine.issue(&IssueRequest {
            client: CLIENT,
            subject: "alice",
            scope: "openid",
            ip: ip(),
        });
        assert!(
            matches!(issued, Err(refresh_guard::Error::Store { .. })),
            "{issued:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    } else {
        assert!(matches!(connected, Err(refresh_guard::Error::Store { .. })));
    }
}

/// A server that stops answering for a while (CLIENT PAUSE): calls in the
/// pause fail within the command timeout, calls after it succeed.
#[test]
fn a_paused_redis_times_out_within_the_bound_then_serves_again() {
    let c = Cluster::new(1, PolicyOverrides::default());
    let t1 = c.issue(0, "alice", at(0));
    c.server.cmd(&["CLIENT", "PAUSE", "1500", "ALL"]);
    let started = std::time::Instant::now();
    let r = c.engines[0]
        .at(at(1))
        .redeem(&RedeemRequest::new(t1.as_str(), CLIENT).ip(ip()));
    let took = started.elapsed();
    assert!(
        matches!(r, Err(refresh_guard::Error::Store { .. })),
        "{r:?}"
    );
    assert!(took < Duration::from_millis(600), "{took:?}");
    std::thread::sleep(Duration::from_millis(1600));
    // The write paused may have been applied after the pause: then this
    // is a grace-less replay of a rotated token; either way an answer.
    let again = c.redeem(0, &t1, at(2));
    assert!(
        again.accepted().is_some() || again.deny_reason() == Some(DenyReason::ReuseDetected),
        "{again:?}"
    );
}

// ---------------------------------------------------------------------------
// Races: one token, two engines, eight threads each.
// ---------------------------------------------------------------------------

/// Smoke test (the deterministic proofs are the stale-cache tests above):
/// 16 threads over two engines present one token at once; with grace one
/// advances the family and every answer is the same successor, without
/// grace exactly one is accepted.
#[test]
fn one_token_raced_across_two_engines_advances_once() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 1_000;
    let server = RedisServer::start();
    let keys = KeyRing::new(KeyId(1), &KeySecret::generate().unwrap());
    let set = PolicySet::builder()
        .client(
            "graceful",
            PolicyOverrides {
                grace_period: Some(Duration::from_secs(10)),
                grace_max_replays: Some(255),
                ..PolicyOverrides::default()
            },
        )
        .client(CLIENT, PolicyOverrides::default())
        .build()
        .unwrap();
    let engines: Vec<Engine> = (0..2)
        .map(|_| {
            Engine::builder()
                .keys(keys.clone())
                .policies(set.clone())
                .shared_store(RedisStore::connect(&server.url(), options()).unwrap())
                .build()
                .unwrap()
        })
        .collect();
    let barrier = std::sync::Barrier::new(2 * THREADS + 1);
    let current: std::sync::Mutex<(String, &str)> = std::sync::Mutex::new((String::new(), ""));
    let answers = std::sync::Mutex::new(Vec::new());
    // Set by the checking thread on a failure or the last round, so that
    // no worker is left waiting at the barrier (a failure must not hang).
    let stop = std::sync::atomic::AtomicBool::new(false);
    let failure = std::thread::scope(|s| {
        for e in &engines {
            for _ in 0..THREADS {
                s.spawn(|| {
                    let mut round = 0u64;
                    loop {
                        barrier.wait();
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            return;
                        }
                        let (token, client) = current.lock().unwrap().clone();
                        let d = e
                            .at(at(round))
                            .redeem(&RedeemRequest::new(&token, client).ip(ip()));
                        answers.lock().unwrap().push(d);
                        round += 1;
                        barrier.wait();
                    }
                });
            }
        }
        let mut failure = None;
        for round in 0..ROUNDS {
            let client = if round % 2 == 0 { "graceful" } else { CLIENT };
            let issued = engines[round % 2]
                .at(at(round as u64))
                .issue(&IssueRequest {
                    client,
                    subject: "alice",
                    scope: "openid",
                    ip: ip(),
                })
                .unwrap();
            *current.lock().unwrap() =
                (issued.accepted().unwrap().token.as_str().to_owned(), client);
            barrier.wait();
            barrier.wait();
            let got = std::mem::take(&mut *answers.lock().unwrap());
            if let Err(why) = check_race(&got, client == "graceful") {
                failure = Some(format!("round {round}: {why}"));
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        barrier.wait();
        failure
    });
    if let Some(why) = failure {
        panic!("{why}");
    }
}

/// One advance; with grace every answer is its successor, without grace
/// it is the only acceptance.
fn check_race(
    got: &[Result<refresh_guard::Decision, refresh_guard::Error>],
    grace: bool,
) -> Result<(), String> {
    let got: Vec<&refresh_guard::Decision> = got
        .iter()
        .map(|r| r.as_ref().map_err(|e| format!("store error: {e}")))
        .collect::<Result<_, _>>()?;
    let rotated: Vec<_> = got
        .iter()
        .filter(|d| kind_of(d) == Some(AcceptKind::Rotated))
        .collect();
    if rotated.len() != 1 {
        return Err(format!("{} rotations: {got:?}", rotated.len()));
    }
    let successor = token_of(rotated[0]);
    let accepted = got.iter().filter(|d| d.accepted().is_some()).count();
    if grace
        && got
            .iter()
            .any(|d| d.accepted().map(|a| &a.token) != Some(&successor))
    {
        return Err(format!("answers differ: {got:?}"));
    }
    if !grace && accepted != 1 {
        return Err(format!("{accepted} acceptances without grace"));
    }
    Ok(())
}

/// Regression: a revocation declined because the engine's cache said
/// "already revoked", while a restore on another engine had made the
/// family active again; whether a family is active is the store's word.
#[test]
fn a_cached_revocation_does_not_hide_a_family_restored_on_another_engine() {
    let c = Cluster::new(2, PolicyOverrides::default());
    let t1 = c.issue(0, "alice", at(0));
    let id = c.engines[0]
        .at(at(0))
        .introspect(t1.as_str())
        .unwrap()
        .family;
    let backup = c.engines[0].family_record(id).unwrap();
    assert!(c.engines[0].at(at(1)).revoke_family(id).unwrap());
    // Engine 0's cache now says revoked; engine 1 restores the backup.
    c.engines[1].restore_family(backup.clone()).unwrap();
    assert!(c.engines[0].at(at(2)).revoke_family(id).unwrap());
    c.engines[1].restore_family(backup.clone()).unwrap();
    assert!(
        c.engines[0]
            .at(at(3))
            .revoke_token(t1.as_str(), Some(CLIENT))
            .unwrap()
    );
    c.engines[1].restore_family(backup.clone()).unwrap();
    assert_eq!(
        c.engines[0]
            .at(at(4))
            .revoke_subject("alice", None)
            .unwrap(),
        1
    );
    c.engines[1].restore_family(backup).unwrap();
    assert_eq!(c.engines[0].at(at(5)).revoke_client(CLIENT).unwrap(), 1);
}

/// A key TTL shorter than a policy's lifetime would let Redis remove a
/// family the policy still accepts: refused at build, naming the option.
#[test]
fn a_key_ttl_shorter_than_a_policys_lifetime_is_refused() {
    let server = RedisServer::start();
    let build = |policy: PolicyOverrides, ttl: Option<Duration>| {
        let mut o = RedisOptions::default();
        o.key_ttl = ttl;
        Engine::builder()
            .policies(PolicySet::builder().client(CLIENT, policy).build().unwrap())
            .shared_store(RedisStore::connect(&server.url(), o).unwrap())
            .build()
            .map(drop)
    };
    let day = Duration::from_secs(86_400);
    // Defaults: idle 30 days, absolute 90: a key unused for 30 days is dead.
    assert!(build(PolicyOverrides::new(), Some(30 * day)).is_ok());
    let short = build(PolicyOverrides::new(), Some(29 * day));
    assert!(
        matches!(
            short,
            Err(refresh_guard::Error::InvalidArgument {
                name: "RedisOptions::key_ttl",
                ..
            })
        ),
        "{short:?}"
    );
    // A policy with neither lifetime never expires: only `None` fits.
    let forever = PolicyOverrides::new().idle_ttl(None).absolute_ttl(None);
    assert!(build(forever.clone(), Some(400 * day)).is_err());
    assert!(build(forever, None).is_ok());
}

/// Poll a future to completion on this thread, with no runtime: the
/// shared store's futures complete from its own thread, whatever awaits.
fn run<F: std::future::Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[test]
fn the_async_forms_await_the_store_from_any_executor() {
    let c = Cluster::new(2, PolicyOverrides::default());
    let t1 = c.issue(0, "alice", at(0));
    let pending = c.engines[1]
        .at(at(1))
        .redeem_async(&RedeemRequest::new(t1.as_str(), CLIENT).ip(ip()))
        .unwrap();
    let t2 = token_of(&run(pending).unwrap());
    // `wait` blocks on the same answer.
    let d = c.engines[0]
        .at(at(2))
        .redeem_async(&RedeemRequest::new(t2.as_str(), CLIENT).ip(ip()))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(d.accepted().unwrap().generation.get(), 3);
    let code = authorize(&c.engines[0], at(3));
    let exchanged = c.engines[1]
        .at(at(4))
        .exchange_async(&ExchangeRequest {
            code: code.as_str(),
            code_verifier: Some("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            client: CLIENT,
            redirect_uri: "https://app.example/cb",
            ip: ip(),
            dpop: None,
        })
        .unwrap();
    assert_eq!(
        kind_of(&run(exchanged).unwrap()),
        Some(AcceptKind::Exchanged)
    );
}

/// A cache of one record: every other family is a miss, one read, and the
/// answers stay one engine's.
#[test]
fn a_cache_smaller_than_the_families_only_costs_reads() {
    let mut o = options();
    o.cache_capacity = 1;
    let c = Cluster::with(RedisServer::start(), 2, grace(), o);
    let mut tokens: Vec<Token> = (0..10)
        .map(|i| c.issue(i % 2, &format!("u{i}"), at(0)))
        .collect();
    for round in 1..4u64 {
        for (i, t) in tokens.iter_mut().enumerate() {
            let d = c.redeem((i + round as usize) % 2, t, at(round));
            assert_eq!(kind_of(&d), Some(AcceptKind::Rotated));
            *t = token_of(&d);
        }
    }
    assert!(c.engines[0].stats().families <= 1);
}

/// The family's key carries its id as a hash tag and the TTL ceiling,
/// refreshed by each write.
#[test]
fn a_family_key_is_hash_tagged_and_carries_the_ttl_ceiling() {
    let server = RedisServer::start();
    let mut o = RedisOptions::default();
    o.key_ttl = Some(Duration::from_secs(100 * 86_400));
    let engine = Engine::builder()
        .shared_store(RedisStore::connect(&server.url(), o).unwrap())
        .build()
        .unwrap();
    let issued = engine
        .issue(&IssueRequest {
            client: CLIENT,
            subject: "alice",
            scope: "openid",
            ip: ip(),
        })
        .unwrap();
    let a = issued.accepted().unwrap();
    let key = format!("rg:f:{{{}}}", a.family);
    let ttl_ms = |server: &RedisServer| match server.cmd(&["PTTL", &key]) {
        redis_support::Reply::Int(n) => n,
        other => panic!("{other:?}"),
    };
    let ceiling = 100 * 86_400 * 1000;
    assert!(ttl_ms(&server) > ceiling - 60_000, "{}", ttl_ms(&server));
    server.cmd(&["PEXPIRE", &key, "5000000"]);
    engine
        .redeem(&RedeemRequest::new(a.token.as_str(), CLIENT).ip(ip()))
        .unwrap();
    assert!(
        ttl_ms(&server) > ceiling - 60_000,
        "refreshed by the rotation"
    );
}

/// Calls of `command` the server has answered (INFO commandstats), those
/// made inside scripts included.
fn calls(server: &RedisServer, command: &str) -> u64 {
    let info = server
        .cmd(&["INFO", "commandstats"])
        .text()
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// (script calls, reads by the engine) between two counts of (EVALSHA,
/// HMGET): each compare-and-set makes one HMGET of its own.
fn between(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    let scripts = b.0 - a.0;
    (scripts, b.1 - a.1 - scripts)
}

fn counts(server: &RedisServer) -> (u64, u64) {
    (calls(server, "evalsha"), calls(server, "hmget"))
}

/// The common path is one round trip: a redemption of a cached family is
/// one script call and no read; a miss adds one read.
#[test]
fn a_cached_redemption_is_one_round_trip_and_a_miss_one_read_more() {
    let c = Cluster::new(2, PolicyOverrides::default());
    let mut t = c.issue(0, "alice", at(0));
    let before = counts(&c.server);
    for i in 1..=10 {
        t = token_of(&c.redeem(0, &t, at(i)));
    }
    let after = counts(&c.server);
    assert_eq!(
        between(before, after),
        (10, 0),
        "one script call each, no read"
    );
    // Engine 1 has never seen the family: one read, then one script call.
    t = token_of(&c.redeem(1, &t, at(11)));
    let missed = counts(&c.server);
    assert_eq!(between(after, missed), (1, 1));
    // Engine 0's cache is now one generation behind: its script call
    // answers with the current record, and the second one writes.
    assert_eq!(kind_of(&c.redeem(0, &t, at(12))), Some(AcceptKind::Rotated));
    assert_eq!(between(missed, counts(&c.server)), (2, 0));
}

/// Shadow mode with a shared store: each engine counts the decisions it
/// made, once each, on the record the store confirmed (a stale first
/// attempt is not counted).
#[test]
fn shadow_counts_each_confirmed_decision_once() {
    let c = Cluster::new(2, PolicyOverrides::default());
    let candidate = PolicySet::builder()
        .client(
            CLIENT,
            PolicyOverrides::new().rotation(refresh_guard::Rotation::Reuse),
        )
        .build()
        .unwrap();
    c.engines[1].set_shadow(candidate);
    let t1 = c.issue(0, "alice", at(0));
    assert!(
        c.engines[1]
            .at(at(0))
            .introspect(t1.as_str())
            .unwrap()
            .active
    );
    let t2 = token_of(&c.redeem(0, &t1, at(1)));
    // Engine 1's cache is a generation behind: two attempts, one decision.
    assert_eq!(kind_of(&c.redeem(1, &t2, at(2))), Some(AcceptKind::Rotated));
    let report = c.engines[1].shadow_report().unwrap();
    assert_eq!(report.count(CLIENT, "rotated", "kept"), 1, "{report:?}");
    assert_eq!(report.rows.iter().map(|r| r.count).sum::<u64>(), 1);
}

/// Regression: opaque access tokens were verified against the in-process
/// table only, so on a shared engine they were never valid, and a family
/// revoked on engine A left them valid on engine B's cache.
#[test]
fn an_access_token_is_live_on_every_engine_until_its_family_is_revoked_on_any() {
    let c = Cluster::new(2, PolicyOverrides::default());
    let t1 = c.issue(0, "alice", at(0));
    let d = c.redeem(1, &t1, at(1));
    let accepted = d.accepted().expect("rotated");
    // Minted by the engine that accepted, verified by both.
    let at1 = c.engines[1].at(at(1)).access_token(accepted, None).unwrap();
    for e in 0..2 {
        let info = c.engines[e]
            .at(at(2))
            .verify_access_token(&at1.token)
            .expect("live on every engine");
        assert_eq!(info.subject(), "alice");
        assert_eq!(info.client(), CLIENT);
    }
    // Engine 1 caches the family as live; the revocation goes through
    // engine 0 and must be seen by engine 1 at once.
    assert!(
        c.engines[0]
            .at(at(3))
            .revoke_family(accepted.family)
            .unwrap()
    );
    for e in [1, 0] {
        assert_eq!(
            c.engines[e].at(at(4)).verify_access_token(&at1.token),
            None,
            "revoked on engine 0, seen by engine {e}"
        );
    }
}

/// Regression: liveness of a shared engine's access token comes from the
/// store, so a store error is "not active", never a cached "active".
#[test]
fn an_access_token_of_a_cached_family_is_not_active_while_the_store_is_down() {
    let mut c = Cluster::new(1, PolicyOverrides::default());
    let t1 = c.issue(0, "alice", at(0));
    let a = c.redeem(0, &t1, at(1));
    let at1 = c.engines[0]
        .at(at(1))
        .access_token(a.accepted().unwrap(), None)
        .unwrap();
    assert!(
        c.engines[0]
            .at(at(2))
            .verify_access_token(&at1.token)
            .is_some()
    );
    c.server.kill();
    assert_eq!(c.engines[0].at(at(2)).verify_access_token(&at1.token), None);
}

/// An access token past its family's idle lifetime under the policy in
/// force is refused by a shared engine too (the store's record decides).
#[test]
fn a_shared_access_token_ends_with_its_familys_idle_lifetime() {
    let policy = PolicyOverrides {
        idle_ttl: Some(Some(Duration::from_secs(60))),
        access_token_ttl: Some(Duration::from_secs(3600)),
        ..PolicyOverrides::default()
    };
    let c = Cluster::new(2, policy);
    let t1 = c.issue(0, "alice", at(0));
    let a = c.redeem(0, &t1, at(1));
    let at1 = c.engines[0]
        .at(at(1))
        .access_token(a.accepted().unwrap(), None)
        .unwrap();
    assert!(
        c.engines[1]
            .at(at(60))
            .verify_access_token(&at1.token)
            .is_some()
    );
    assert_eq!(
        c.engines[1].at(at(62)).verify_access_token(&at1.token),
        None
    );
}

fn wait_linked(replica: &RedisServer) {
    replica.wait_until("master_link_status:up", Duration::from_secs(20), || {
        replica
            .cmd(&["INFO", "replication"])
            .text()
            .is_some_and(|i| i.contains("master_link_status:up"))
    });
}

/// Regression (`wait_replicas` did not exist): a write acknowledged by
/// fewer replicas than asked must be a bounded `Error::Store` naming the
/// shortfall, never an acceptance and never a hang; the store serves
/// again once the replica is back.
#[test]
fn a_missing_replica_makes_each_waited_write_a_bounded_store_error() {
    let primary = RedisServer::start();
    let mut replica = RedisServer::options().replica_of(&primary).start();
    wait_linked(&replica);
    let mut o = options();
    o.wait_replicas = 1;
    let c = Cluster::with(primary, 1, grace(), o);
    let t1 = c.issue(0, "alice", at(0));
    let t2 = token_of(&c.redeem(0, &t1, at(1)));
    replica.stop();
    for i in 0..2u64 {
        let started = std::time::Instant::now();
        let r = c.engines[0]
            .at(at(2 + i))
            .redeem(&RedeemRequest::new(t2.as_str(), CLIENT).ip(ip()));
        let took = started.elapsed();
        match r {
            Err(refresh_guard::Error::Store { detail, .. }) => {
                assert!(detail.contains("0 of 1 replicas"), "{detail}");
            }
            other => panic!("attempt {i}: expected a store error, got {other:?}"),
        }
        assert!(took < Duration::from_secs(2), "attempt {i} took {took:?}");
    }
    // An issue waits too (its subject's set and record).
    let issued = c.engines[0].at(at(4)).issue(&IssueRequest {
        client: CLIENT,
        subject: "bob",
        scope: "openid",
        ip: ip(),
    });
    assert!(matches!(issued, Err(refresh_guard::Error::Store { .. })));
    replica.restart();
    wait_linked(&replica);
    // The writes stayed on the primary: t2 was rotated by the first
    // attempt, so the client's retry is a grace replay of the successor
    // it never saw, and that successor rotates.
    let d = c.redeem(0, &t2, at(5));
    assert_eq!(kind_of(&d), Some(AcceptKind::GraceReplay));
    let t3 = token_of(&d);
    assert_eq!(kind_of(&c.redeem(0, &t3, at(6))), Some(AcceptKind::Rotated));
}

/// `wait_timeout` must answer a shortfall before the command timeout.
#[test]
fn a_wait_timeout_not_below_the_command_timeout_is_refused() {
    let server = RedisServer::start();
    let mut o = options();
    o.wait_replicas = 1;
    o.wait_timeout = o.command_timeout;
    assert!(matches!(
        RedisStore::connect(&server.url(), o),
        Err(refresh_guard::Error::InvalidArgument {
            name: "wait_timeout",
            ..
        })
    ));
}
