//! Shadow evaluation: a candidate policy set decides beside the active one on
//! live traffic, with no effect, then is promoted or dropped.

mod common;

use std::time::Duration;

use common::{CLIENT, Harness, ip};
use refresh_guard::RedeemRequest;
use refresh_guard::{DenyReason, PolicyOverrides, PolicySet};

fn set(o: PolicyOverrides) -> PolicySet {
    PolicySet::builder().client(CLIENT, o).build().unwrap()
}

/// A tightened allow-list: the candidate would deny the refreshes from
/// outside it; the active set still accepts them and nothing changes.
#[test]
fn shadow_counts_a_tightened_allow_list() {
    let h = Harness::new(PolicyOverrides::new());
    let candidate = set(PolicyOverrides::new().ip_allowlist(vec!["10.0.0.0/8".parse().unwrap()]));
    let cv = h.engine.set_shadow(candidate);
    let mut inside = h.issue();
    let mut outside = h.issue_for("bob");
    for _ in 0..3 {
        inside = h
            .engine
            .redeem(&RedeemRequest::new(&inside, CLIENT).ip(ip("10.9.9.9")))
            .unwrap()
            .accepted()
            .unwrap()
            .token;
        outside = h
            .engine
            .redeem(&RedeemRequest::new(&outside, CLIENT).ip(ip("198.51.100.1")))
            .unwrap()
            .accepted()
            .expect("the shadow has no effect")
            .token;
    }
    let r = h.engine.shadow_report().unwrap();
    assert_eq!(r.candidate, cv);
    assert_eq!(r.active, h.engine.policies().version());
    assert_eq!(r.count(CLIENT, "rotated", "rotated"), 3);
    assert_eq!(r.count(CLIENT, "rotated", "ip_not_allowed"), 3);
    assert_eq!(r.changed().map(|row| row.count).sum::<u64>(), 3);
    // Promote: the candidate is now in force.
    assert_eq!(h.engine.promote_shadow(), Some(cv));
    assert_eq!(h.engine.policies().version(), cv);
    assert!(h.engine.shadow_report().is_none());
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&outside, CLIENT).ip(ip("198.51.100.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::IpNotAllowed)
    );
}

/// A shortened idle TTL: families idle longer than the candidate's TTL would
/// expire; under the active set they rotate.
#[test]
fn shadow_counts_a_shortened_idle_ttl() {
    let h = Harness::new(PolicyOverrides::new());
    h.engine.set_shadow(set(
        PolicyOverrides::new().idle_ttl(Some(Duration::from_secs(3600)))
    ));
    let fresh = h.issue();
    let stale = h.issue_for("bob");
    h.advance(1800);
    h.engine
        .redeem(&RedeemRequest::new(&fresh, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap();
    h.advance(7200);
    h.engine
        .redeem(&RedeemRequest::new(&stale, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap();
    let r = h.engine.shadow_report().unwrap();
    assert_eq!(r.count(CLIENT, "rotated", "rotated"), 1);
    assert_eq!(r.count(CLIENT, "rotated", "expired_idle"), 1);
    assert!(h.engine.drop_shadow());
    assert!(!h.engine.drop_shadow());
    assert!(h.engine.shadow_report().is_none());
}

/// The shadow never changes state, even where it would revoke: a replay
/// that is a grace replay under the active set but reuse under a candidate
/// without grace does not revoke the family.
#[test]
fn shadow_has_no_effect_even_where_it_would_revoke() {
    let h = Harness::new(PolicyOverrides::new().grace_period(Duration::from_secs(30)));
    h.engine.set_shadow(set(PolicyOverrides::new()));
    let t1 = h.issue();
    let t2 = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    let replay = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    assert_eq!(replay, t2);
    let r = h.engine.shadow_report().unwrap();
    assert_eq!(r.count(CLIENT, "grace_replay", "reuse_detected"), 1);
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&t2, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
    assert!(
        h.sink
            .events()
            .iter()
            .all(|e| e.kind.as_str() != "reuse_detected")
    );
}

/// A new candidate starts its counts from zero.
#[test]
fn new_candidate_resets_counts() {
    let h = Harness::new(PolicyOverrides::new());
    h.engine.set_shadow(set(PolicyOverrides::new()));
    let t = h.issue();
    let t = h
        .engine
        .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    assert_eq!(h.engine.shadow_report().unwrap().rows.len(), 1);
    h.engine
        .set_shadow(set(PolicyOverrides::new().grace_max_replays(3)));
    assert!(h.engine.shadow_report().unwrap().rows.is_empty());
    h.engine
        .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap();
    assert_eq!(
        h.engine
            .shadow_report()
            .unwrap()
            .count(CLIENT, "rotated", "rotated"),
        1
    );
}
