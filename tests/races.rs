//! Races on one token with real threads released together by a barrier.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{CLIENT, Harness, ip};
use refresh_guard::RedeemRequest;
use refresh_guard::{
    AcceptKind, Decision, DenyReason, Engine, Generation, IssueRequest, ManualClock, OnReuse,
    PolicyOverrides, PolicySet,
};

const THREADS: usize = 8;
const ROUNDS: usize = 1000;

fn race(h: &Harness, token: &str) -> Vec<Decision> {
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    h.engine
                        .redeem(
                            &RedeemRequest::new(token, CLIENT).ip(ip(&format!("10.0.0.{}", i + 1))),
                        )
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

/// With a grace period, N racing redemptions of one token all receive the
/// identical successor and the family advances exactly once.
#[test]
fn racing_redemptions_in_grace_share_one_successor() {
    let h = Harness::new(
        PolicyOverrides::new()
            .grace_period(Duration::from_secs(10))
            .grace_max_replays(u8::MAX),
    );
    for _ in 0..ROUNDS {
        let t = h.issue();
        let out = race(&h, &t);
        let accepted: Vec<_> = out
            .iter()
            .map(|d| d.accepted().expect("all accepted").clone())
            .collect();
        let rotated = accepted
            .iter()
            .filter(|a| a.kind == AcceptKind::Rotated)
            .count();
        assert_eq!(rotated, 1, "exactly one rotation");
        assert!(accepted.iter().all(|a| a.token == accepted[0].token));
        assert!(accepted.iter().all(|a| a.generation == Generation::new(2)));
        let i = h.engine.introspect(&accepted[0].token).unwrap();
        assert_eq!(i.current_generation, Generation::new(2));
        assert!(i.active);
    }
}

/// Without grace, exactly one of N racing redemptions succeeds; the first
/// loser is reuse and revokes the family, later ones find it revoked.
#[test]
fn racing_redemptions_without_grace_have_one_winner() {
    let h = Harness::new(PolicyOverrides::new());
    for _ in 0..ROUNDS {
        let t = h.issue();
        let out = race(&h, &t);
        let winners: Vec<_> = out.iter().filter_map(|d| d.accepted()).collect();
        assert_eq!(winners.len(), 1);
        let reasons: Vec<_> = out.iter().filter_map(|d| d.deny_reason()).collect();
        assert_eq!(reasons.len(), THREADS - 1);
        assert_eq!(
            reasons
                .iter()
                .filter(|r| **r == DenyReason::ReuseDetected)
                .count(),
            1,
            "the first loser detects reuse: {reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .all(|r| matches!(r, DenyReason::ReuseDetected | DenyReason::Revoked))
        );
        assert_eq!(
            h.engine
                .redeem(&RedeemRequest::new(&winners[0].token, CLIENT).ip(ip("10.0.0.1")))
                .unwrap()
                .deny_reason(),
            Some(DenyReason::Revoked),
            "family revoked per on_reuse"
        );
    }
}

/// With `report_only`, every loser is reuse and the winner's successor lives.
#[test]
fn racing_redemptions_report_only_keep_the_winner() {
    let h = Harness::new(PolicyOverrides::new().on_reuse(OnReuse::ReportOnly));
    for _ in 0..ROUNDS / 4 {
        let t = h.issue();
        let out = race(&h, &t);
        let winners: Vec<_> = out.iter().filter_map(|d| d.accepted()).collect();
        assert_eq!(winners.len(), 1);
        assert!(
            out.iter()
                .filter_map(|d| d.deny_reason())
                .all(|r| r == DenyReason::ReuseDetected)
        );
        assert!(
            h.engine
                .redeem(&RedeemRequest::new(&winners[0].token, CLIENT).ip(ip("10.0.0.1")))
                .unwrap()
                .accepted()
                .is_some()
        );
    }
}

/// Redemption, revocation and sweeping of one family are atomic with respect
/// to each other: once revoke returns, no redemption of the family succeeds,
/// and a chain of rotations never forks. The redeemer rotates until the
/// revocation lands (so every round really races it), and revoked families
/// are kept for no time, so the sweeper removes the family while the
/// redeemer may still hold its token.
#[test]
fn redeem_revoke_and_sweep_race_without_forks() {
    let clock = Arc::new(ManualClock::new(common::START));
    let engine = Engine::builder()
        .policies(
            PolicySet::builder()
                .client(
                    CLIENT,
                    PolicyOverrides::new().grace_period(Duration::from_secs(10)),
                )
                .build()
                .unwrap(),
        )
        .clock(clock)
        .revoked_retention(Duration::ZERO)
        .build()
        .unwrap();
    let issue = || {
        engine
            .issue(&IssueRequest {
                client: CLIENT,
                subject: "alice",
                scope: "openid",
                ip: Some(ip("10.0.0.1")),
            })
            .unwrap()
            .accepted()
            .unwrap()
            .token
    };
    let mut swept = 0;
    for _ in 0..200 {
        let t = issue();
        let barrier = Barrier::new(3);
        let revoked = AtomicBool::new(false);
        std::thread::scope(|s| {
            let redeemer = s.spawn(|| {
                barrier.wait();
                let mut cur = t;
                let mut last_gen = Generation::FIRST;
                for _ in 0..10_000_000 {
                    let revoke_returned = revoked.load(Ordering::SeqCst);
                    match engine
                        .redeem(&RedeemRequest::new(&cur, CLIENT).ip(ip("10.0.0.1")))
                        .unwrap()
                    {
                        Decision::Accept(a) => {
                            assert!(!revoke_returned, "accepted after revoke returned");
                            assert!(a.generation > last_gen, "generations only grow");
                            last_gen = a.generation;
                            cur = a.token;
                        }
                        Decision::Deny(d) => {
                            // Revoked, or already swept away.
                            assert!(
                                matches!(d.reason, DenyReason::Revoked | DenyReason::InvalidToken),
                                "{d:?}"
                            );
                            // Once revoked, it stays revoked (or gone).
                            let again = engine
                                .redeem(&RedeemRequest::new(&cur, CLIENT).ip(ip("10.0.0.1")))
                                .unwrap();
                            assert!(again.accepted().is_none(), "revived: {again:?}");
                            return;
                        }
                    }
                }
                panic!("the revocation never landed");
            });
            let sweeper = s.spawn(|| {
                barrier.wait();
                let mut removed = 0;
                // Sweep until the revoked family is gone (bounded).
                for _ in 0..1_000_000 {
                    removed += engine.sweep(1024).unwrap().removed;
                    if removed > 0 {
                        break;
                    }
                    std::thread::yield_now();
                }
                removed
            });
            s.spawn(|| {
                barrier.wait();
                std::thread::yield_now();
                assert_eq!(engine.revoke_subject("alice", None).unwrap(), 1);
                revoked.store(true, Ordering::SeqCst);
            });
            redeemer.join().unwrap();
            swept += sweeper.join().unwrap();
        });
    }
    assert_eq!(swept, 200, "the sweeper removed every revoked family");
    assert_eq!(engine.stats().families, 0);
}

/// Zero grace under a real race: the winner rotates, every loser is
/// reuse or finds the family revoked; no loser is ever a grace replay,
/// whatever the order in which the threads read the clock. (Smoke test;
/// `zero_grace_denies_a_loser_whose_clock_precedes_the_rotation` in
/// tests/decisions.rs pins the exact timestamps.)
#[test]
fn zero_grace_racers_never_get_a_grace_replay() {
    // The system clock (not the coarse default) changes between most reads.
    let engine = Engine::builder()
        .clock(refresh_guard::SystemClock)
        .build()
        .unwrap();
    for _ in 0..ROUNDS {
        let t = engine
            .issue(&IssueRequest {
                client: CLIENT,
                subject: "alice",
                scope: "openid",
                ip: Some(ip("10.0.0.1")),
            })
            .unwrap()
            .accepted()
            .unwrap()
            .token;
        let barrier = Barrier::new(THREADS);
        let out: Vec<Decision> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    let (barrier, engine, t) = (&barrier, &engine, &t);
                    s.spawn(move || {
                        barrier.wait();
                        engine
                            .redeem(&RedeemRequest::new(t, CLIENT).ip(ip("10.0.0.1")))
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|j| j.join().unwrap()).collect()
        });
        assert!(
            out.iter()
                .all(|d| d.accepted().is_none_or(|a| a.kind == AcceptKind::Rotated)),
            "{out:?}"
        );
        assert_eq!(out.iter().filter(|d| d.accepted().is_some()).count(), 1);
    }
}
