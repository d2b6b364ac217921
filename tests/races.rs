//! Races on one token with real threads released together by a barrier.

mod common;

use std::sync::Barrier;
use std::time::Duration;

use common::{CLIENT, Harness, ip};
use refresh_guard::{AcceptKind, Decision, DenyReason, Generation, OnReuse, PolicyOverrides};

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
                        .redeem(token, CLIENT, ip(&format!("10.0.0.{}", i + 1)))
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
            .map(|d| *d.accepted().expect("all accepted"))
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
                .redeem(&winners[0].token, CLIENT, ip("10.0.0.1"))
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
                .redeem(&winners[0].token, CLIENT, ip("10.0.0.1"))
                .unwrap()
                .accepted()
                .is_some()
        );
    }
}

/// Redemption, revocation and sweeping of one family are atomic with respect
/// to each other: once revoke returns, no redemption of the family succeeds,
/// and a chain of rotations never forks.
#[test]
fn redeem_revoke_and_sweep_race_without_forks() {
    let h = Harness::new(PolicyOverrides::new().grace_period(Duration::from_secs(10)));
    for _ in 0..200 {
        let t = h.issue();
        let barrier = Barrier::new(3);
        std::thread::scope(|s| {
            let redeemer = s.spawn(|| {
                barrier.wait();
                let mut cur = t;
                let mut accepted_after_revocation = 0;
                let mut last_gen = Generation::FIRST;
                for _ in 0..200 {
                    match h.engine.redeem(&cur, CLIENT, ip("10.0.0.1")).unwrap() {
                        Decision::Accept(a) => {
                            assert!(a.generation > last_gen, "generations only grow");
                            last_gen = a.generation;
                            cur = a.token;
                        }
                        Decision::Deny(d) => {
                            assert_eq!(d.reason, DenyReason::Revoked);
                            // Once revoked, it stays revoked.
                            let again = h.engine.redeem(&cur, CLIENT, ip("10.0.0.1")).unwrap();
                            if again.accepted().is_some() {
                                accepted_after_revocation += 1;
                            }
                            break;
                        }
                    }
                }
                accepted_after_revocation
            });
            s.spawn(|| {
                barrier.wait();
                for _ in 0..50 {
                    h.engine.sweep(1024).unwrap();
                }
            });
            s.spawn(|| {
                barrier.wait();
                std::thread::yield_now();
                h.engine.revoke_subject("alice", None).unwrap();
            });
            assert_eq!(redeemer.join().unwrap(), 0);
        });
    }
}
