//! One test per denial reason and per ordering rule of the order of checks
//! (docs/design.md, "The refresh decision"), through the public engine API.

mod common;

use std::time::Duration;

use common::{CLIENT, Harness, ip};
use refresh_guard::RedeemRequest;
use refresh_guard::{
    AcceptKind, DenyReason, Engine, EventKind, Generation, IpCheck, IssueRequest, OnReuse,
    PolicyOverrides, PolicySet, RevokeReason, Rotation, Status, Timestamp, Token,
};

fn allow(entries: &[&str]) -> Vec<refresh_guard::IpRange> {
    entries.iter().map(|e| e.parse().unwrap()).collect()
}

/// A rotation returns generation c+1, and the successor is what works next.
#[test]
fn rotation_returns_the_next_generation() {
    let h = Harness::new(PolicyOverrides::new());
    let t1 = h.issue();
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    let a = d.accepted().unwrap();
    assert_eq!(a.kind, AcceptKind::Rotated);
    assert_eq!(a.generation, Generation::new(2));
    assert_ne!(a.token, t1);
    let a3 = h
        .engine
        .redeem(&RedeemRequest::new(&a.token, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .clone();
    assert_eq!(a3.generation, Generation::new(3));
}

/// Malformed tokens are `invalid_token` and change nothing.
#[test]
fn malformed_token_is_invalid() {
    let h = Harness::new(PolicyOverrides::new());
    let t = h.issue();
    for bad in [
        "",
        "rgt_",
        "not a token",
        &t[..t.len() - 1],
        &format!("{}x", &*t),
    ] {
        let d = h
            .engine
            .redeem(&RedeemRequest::new(bad, CLIENT).ip(ip("10.0.0.1")))
            .unwrap();
        assert_eq!(d.deny_reason(), Some(DenyReason::InvalidToken), "{bad:?}");
    }
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
}

/// An authorization code is not a refresh token.
#[test]
fn code_prefix_is_not_a_refresh_token() {
    let h = Harness::new(PolicyOverrides::new());
    let t = h.issue();
    let as_code = format!("rgc_{}", &t[4..]);
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&as_code, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::InvalidToken));
}

/// A forged token for a live family is `invalid_token` and never revokes it,
/// even when the forged generation is an old one (which would be reuse if the
/// tag were valid).
#[test]
fn forged_token_never_revokes_a_live_family() {
    let h = Harness::new(PolicyOverrides::new());
    let t1 = h.issue();
    let t2 = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    // Flip a tag character (not the last: it carries padding bits).
    let mut forged = t1.as_str().to_owned();
    let i = forged.len() - 5;
    let c = if &forged[i..=i] == "A" { "B" } else { "A" };
    forged.replace_range(i..=i, c);
    for _ in 0..3 {
        let d = h
            .engine
            .redeem(&RedeemRequest::new(&forged, CLIENT).ip(ip("192.0.2.99")))
            .unwrap();
        assert_eq!(d.deny_reason(), Some(DenyReason::InvalidToken));
        assert_eq!(d.accepted(), None);
    }
    assert!(h.sink.events().is_empty(), "a forgery raises no event");
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&t2, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .unwrap()
            .generation,
        Generation::new(3)
    );
}

/// Tokens of an unknown family (e.g. swept, or from another deployment) are invalid.
#[test]
fn unknown_family_is_invalid() {
    let h = Harness::new(PolicyOverrides::new());
    let other = Harness::new(PolicyOverrides::new());
    let t = other.issue();
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::InvalidToken));
}

/// Another client's token is `client_mismatch`, emits an event, and does
/// not touch the family.
#[test]
fn client_mismatch_denies_and_reports() {
    let h = Harness::new(PolicyOverrides::new());
    let t = h.issue();
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t, "evil-client").ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::ClientMismatch));
    let ev = h.sink.take();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        ev[0].kind,
        EventKind::ClientMismatch {
            presented_client: "evil-client".into()
        }
    );
    assert_eq!(ev[0].client.as_deref(), Some(CLIENT));
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
}

/// Client binding is checked before revocation and expiry: a foreign client
/// learns nothing about the family's state.
#[test]
fn client_binding_precedes_revocation() {
    let h = Harness::new(PolicyOverrides::new());
    let t = h.issue();
    assert!(h.engine.revoke_token(&t, None).unwrap());
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t, "evil-client").ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::ClientMismatch));
}

/// A revoked family denies `revoked`.
#[test]
fn revoked_family_denies() {
    let h = Harness::new(PolicyOverrides::new());
    let t = h.issue();
    assert!(h.engine.revoke_token(&t, Some(CLIENT)).unwrap());
    assert!(
        !h.engine.revoke_token(&t, Some(CLIENT)).unwrap(),
        "already revoked"
    );
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::Revoked));
}

/// RFC 7009: a client cannot revoke another client's token.
#[test]
fn revoke_token_of_another_client_is_refused() {
    let h = Harness::new(PolicyOverrides::new());
    let t = h.issue();
    assert!(!h.engine.revoke_token(&t, Some("other")).unwrap());
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
}

/// The absolute lifetime denies `expired_absolute`, even for a family in use.
#[test]
fn absolute_lifetime_expires() {
    let h = Harness::new(
        PolicyOverrides::new()
            .absolute_ttl(Some(Duration::from_secs(100)))
            .idle_ttl(Some(Duration::from_secs(60))),
    );
    let mut t = h.issue();
    for _ in 0..3 {
        h.advance(30);
        t = h
            .engine
            .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .unwrap()
            .token;
    }
    h.advance(10);
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::ExpiredAbsolute));
}

/// Unused for the idle TTL: `expired_idle`; each use pushes it back.
#[test]
fn idle_ttl_expires() {
    let h = Harness::new(PolicyOverrides::new().idle_ttl(Some(Duration::from_secs(60))));
    let mut t = h.issue();
    // Three uses 59 s apart: 177 s after issue, far past one idle TTL.
    for _ in 0..3 {
        h.advance(59);
        t = h
            .engine
            .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .expect("each use pushes the idle expiry back")
            .token;
    }
    h.advance(60);
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::ExpiredIdle));
}

/// An expired family denies before any generation logic: replaying an old
/// token of an expired family is `expired_*`, not reuse, and revokes nothing.
#[test]
fn expiry_precedes_reuse_detection() {
    let h = Harness::new(PolicyOverrides::new().idle_ttl(Some(Duration::from_secs(60))));
    let t1 = h.issue();
    let _t2 = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    h.advance(61);
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::ExpiredIdle));
    assert!(h.sink.events().is_empty());
}

/// Policies apply at redemption time: shortening the idle TTL after issue
/// expires existing families.
#[test]
fn policy_in_force_at_redemption_decides() {
    let h = Harness::new(PolicyOverrides::new());
    let t = h.issue();
    h.advance(120);
    let v_old = h.engine.policies().version();
    h.engine.swap_policies(
        PolicySet::builder()
            .client(
                CLIENT,
                PolicyOverrides::new().idle_ttl(Some(Duration::from_secs(60))),
            )
            .build()
            .unwrap(),
    );
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::ExpiredIdle));
    assert_ne!(d.policy_version(), v_old);
    assert_eq!(d.policy_version(), h.engine.policies().version());
}

/// Reuse outside grace revokes the family and raises reuse + revocation events.
#[test]
fn reuse_revokes_family() {
    let h = Harness::new(PolicyOverrides::new());
    let t1 = h.issue();
    let t2 = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.9")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::ReuseDetected));
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&t2, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked)
    );
    let ev = h.sink.take();
    let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["reuse_detected", "family_revoked"]);
    assert_eq!(
        ev[0].kind,
        EventKind::ReuseDetected {
            presented: Generation::new(1),
            current: Generation::new(2),
            response: OnReuse::RevokeFamily
        }
    );
    assert_eq!(ev[0].ip, Some(ip("10.0.0.9")));
    assert_eq!(ev[0].subject.as_deref(), Some("alice"));
    assert_eq!(ev[0].policy_version, h.engine.policies().version());
}

/// A replayed old token from a foreign network is reuse, not ip_not_allowed.
#[test]
fn reuse_precedes_allow_list() {
    let h = Harness::new(PolicyOverrides::new().ip_allowlist(allow(&["10.0.0.0/8"])));
    let t1 = h.issue();
    let _t2 = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap();
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("198.51.100.7")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::ReuseDetected));
}

/// Outside the allow-list: `ip_not_allowed`, an event, and no revocation.
#[test]
fn ip_outside_allow_list_is_denied_without_revocation() {
    let h =
        Harness::new(PolicyOverrides::new().ip_allowlist(allow(&["10.0.0.0/8", "2001:db8::/32"])));
    let t = h.issue();
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("198.51.100.7")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::IpNotAllowed));
    let ev = h.sink.take();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::IpNotAllowed);
    assert_eq!(ev[0].ip, Some(ip("198.51.100.7")));
    // The owner came home: the same token still works.
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("2001:db8::5")))
            .unwrap()
            .accepted()
            .is_some()
    );
}

/// The allow-list applies at issuance in both modes; `issuance_only` skips it
/// on refresh.
#[test]
fn allow_list_at_issuance_and_issuance_only_mode() {
    let h = Harness::new(
        PolicyOverrides::new()
            .ip_allowlist(allow(&["10.0.0.0/8"]))
            .ip_check(IpCheck::IssuanceOnly),
    );
    let denied = h
        .engine
        .issue(&IssueRequest {
            client: CLIENT,
            subject: "bob",
            scope: "",
            ip: Some(ip("198.51.100.7")),
        })
        .unwrap();
    assert_eq!(denied.deny_reason(), Some(DenyReason::IpNotAllowed));
    assert_eq!(h.engine.stats().families, 0);
    let t = h.issue();
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("198.51.100.7")))
            .unwrap()
            .accepted()
            .is_some()
    );
}

/// A family moved to another engine (same keys) keeps working there even
/// when the table slot its id names is taken by a family of that engine, and
/// sweeping removes it cleanly; the engine's own families are untouched.
#[test]
fn family_restored_into_a_busy_engine_works_there() {
    use refresh_guard::{KeyId, KeyRing, KeySecret};
    let keys = KeyRing::new(KeyId(1), &KeySecret::from_bytes([9; 32]));
    let engine = |shards| {
        Engine::builder()
            .keys(keys.clone())
            .shards(shards)
            .revoked_retention(Duration::ZERO)
            .build()
            .unwrap()
    };
    let issue = |e: &Engine, subject: &str| {
        e.issue(&IssueRequest {
            client: CLIENT,
            subject,
            scope: "openid",
            ip: Some(ip("10.0.0.1")),
        })
        .unwrap()
        .accepted()
        .unwrap()
        .token
    };
    // One shard each: every family of `a` names a slot `b` already fills.
    let (a, b) = (engine(1), engine(1));
    let moved: Vec<Token> = (0..20).map(|i| issue(&a, &format!("m{i}"))).collect();
    let own: Vec<Token> = (0..50).map(|i| issue(&b, &format!("o{i}"))).collect();
    for t in &moved {
        let id = a.introspect(t).unwrap().family;
        b.restore_family(a.family_record(id).unwrap()).unwrap();
    }
    assert_eq!(b.stats().families, 70);
    let rotate = |e: &Engine, t: &Token| {
        e.redeem(&RedeemRequest::new(t, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .expect("accepted")
            .token
    };
    let moved: Vec<Token> = moved.iter().map(|t| rotate(&b, t)).collect();
    let own: Vec<Token> = own.iter().map(|t| rotate(&b, t)).collect();
    // New families in `b` still get fresh slots and ids.
    let fresh = issue(&b, "fresh");
    rotate(&b, &fresh);
    for t in &moved {
        assert!(b.revoke_token(t, None).unwrap());
    }
    b.sweep(1_000).unwrap();
    assert_eq!(b.stats().families, 51);
    for t in &moved {
        assert_eq!(
            b.redeem(&RedeemRequest::new(t, CLIENT).ip(ip("10.0.0.1")))
                .unwrap()
                .deny_reason(),
            Some(DenyReason::InvalidToken),
            "swept"
        );
    }
    for t in &own {
        rotate(&b, t);
    }
}

/// A generation newer than the state is a rollback (a restored backup): deny
/// and report, revoke nothing.
#[test]
fn newer_generation_is_state_rollback() {
    let h = Harness::new(PolicyOverrides::new());
    let t1 = h.issue();
    let id = h.engine.introspect(&t1).unwrap().family;
    let backup = h.engine.family_record(id).unwrap();
    let t2 = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    h.engine.restore_family(backup).unwrap();
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t2, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::StateRollback));
    let ev = h.sink.take();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        ev[0].kind,
        EventKind::StateRollback {
            presented: Generation::new(2),
            current: Generation::new(1)
        }
    );
    // Nothing was revoked: the restored generation still works.
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
}

/// Grace: replaying the predecessor inside the window returns the identical
/// successor, without advancing the family.
#[test]
fn grace_replay_returns_the_same_successor() {
    let h = Harness::new(PolicyOverrides::new().grace_period(Duration::from_secs(10)));
    let t1 = h.issue();
    let a = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .clone();
    h.advance(5);
    let b = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.2")))
        .unwrap()
        .accepted()
        .unwrap()
        .clone();
    assert_eq!(b.kind, AcceptKind::GraceReplay);
    assert_eq!(b.token, a.token);
    assert_eq!(b.generation, a.generation);
    let c = h
        .engine
        .redeem(&RedeemRequest::new(&a.token, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .generation;
    assert_eq!(c, Generation::new(3));
}

/// Grace replays beyond `grace_max_replays` are reuse.
#[test]
fn grace_replays_beyond_max_are_reuse() {
    let h = Harness::new(
        PolicyOverrides::new()
            .grace_period(Duration::from_secs(10))
            .grace_max_replays(2),
    );
    let t1 = h.issue();
    h.engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            h.engine
                .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
                .unwrap()
                .accepted()
                .unwrap()
                .kind,
            AcceptKind::GraceReplay
        );
    }
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::ReuseDetected));
}

/// After the grace period the predecessor is reuse.
#[test]
fn grace_period_ends() {
    let h = Harness::new(PolicyOverrides::new().grace_period(Duration::from_secs(10)));
    let t1 = h.issue();
    h.engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap();
    h.advance(10);
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::ReuseDetected)
    );
}

/// Only the immediate predecessor gets grace; older generations are reuse.
#[test]
fn grace_covers_only_the_predecessor() {
    let h = Harness::new(PolicyOverrides::new().grace_period(Duration::from_secs(10)));
    let t1 = h.issue();
    let t2 = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    h.engine
        .redeem(&RedeemRequest::new(&t2, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap();
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::ReuseDetected)
    );
}

/// `grace_same_ip` refuses a replay from another IP (it is reuse).
#[test]
fn grace_same_ip_refuses_other_ip() {
    let h = Harness::new(
        PolicyOverrides::new()
            .grace_period(Duration::from_secs(10))
            .grace_same_ip(true)
            .grace_max_replays(5),
    );
    let t1 = h.issue();
    h.engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap();
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .unwrap()
            .kind,
        AcceptKind::GraceReplay
    );
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.2")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::ReuseDetected)
    );
}

/// Grace replay survives a key rotation: the same successor comes back.
#[test]
fn grace_replay_is_stable_across_key_rotation() {
    let h = Harness::new(PolicyOverrides::new().grace_period(Duration::from_secs(10)));
    let t1 = h.issue();
    let a = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    let mut ring = (*h.engine.key_ring()).clone();
    ring.add(
        refresh_guard::KeyId(9),
        &refresh_guard::KeySecret::from_bytes([5; 32]),
    )
    .unwrap();
    ring.set_active(refresh_guard::KeyId(9)).unwrap();
    h.engine.set_key_ring(ring);
    let b = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    assert_eq!(a, b);
}

/// Removing a key kills its tokens as `invalid_token`, revoking nothing.
#[test]
fn removed_key_tokens_are_invalid() {
    let h = Harness::new(PolicyOverrides::new());
    let t = h.issue();
    let mut ring = (*h.engine.key_ring()).clone();
    let old = ring.active();
    ring.add(
        refresh_guard::KeyId(9),
        &refresh_guard::KeySecret::from_bytes([5; 32]),
    )
    .unwrap();
    ring.set_active(refresh_guard::KeyId(9)).unwrap();
    ring.remove(old).unwrap();
    h.engine.set_key_ring(ring);
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::InvalidToken)
    );
    assert!(h.sink.events().is_empty());
}

/// `rotation = "reuse"`: the same token stays valid, only last-use moves.
#[test]
fn reuse_rotation_keeps_the_token() {
    let h = Harness::new(
        PolicyOverrides::new()
            .rotation(Rotation::Reuse)
            .idle_ttl(Some(Duration::from_secs(60))),
    );
    let t = h.issue();
    for _ in 0..5 {
        h.advance(50);
        let a = h
            .engine
            .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .unwrap()
            .clone();
        assert_eq!(a.kind, AcceptKind::Kept);
        assert_eq!(a.token, t);
        assert_eq!(a.generation, Generation::FIRST);
    }
}

/// `on_reuse = revoke_subject_client` revokes the subject's families for this
/// client only; `revoke_subject` revokes all of them.
#[test]
fn on_reuse_subject_scopes() {
    for (on_reuse, other_client_survives) in [
        (OnReuse::RevokeSubjectClient, true),
        (OnReuse::RevokeSubject, false),
    ] {
        let set = PolicySet::builder()
            .defaults(PolicyOverrides::new().on_reuse(on_reuse))
            .build()
            .unwrap();
        let h = Harness::with_set(set);
        let a1 = h.issue_for("alice");
        let a2 = h.issue_for("alice");
        let b1 = h.issue_for("bob");
        let other = h
            .engine
            .issue(&IssueRequest {
                client: "web",
                subject: "alice",
                scope: "",
                ip: Some(ip("10.0.0.1")),
            })
            .unwrap()
            .accepted()
            .unwrap()
            .token;
        h.engine
            .redeem(&RedeemRequest::new(&a1, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .unwrap();
        assert_eq!(
            h.engine
                .redeem(&RedeemRequest::new(&a1, CLIENT).ip(ip("10.0.0.1")))
                .unwrap()
                .deny_reason(),
            Some(DenyReason::ReuseDetected)
        );
        assert_eq!(
            h.engine
                .redeem(&RedeemRequest::new(&a2, CLIENT).ip(ip("10.0.0.1")))
                .unwrap()
                .deny_reason(),
            Some(DenyReason::Revoked)
        );
        assert!(
            h.engine
                .redeem(&RedeemRequest::new(&b1, CLIENT).ip(ip("10.0.0.1")))
                .unwrap()
                .accepted()
                .is_some()
        );
        let o = h
            .engine
            .redeem(&RedeemRequest::new(&other, "web").ip(ip("10.0.0.1")))
            .unwrap();
        assert_eq!(
            o.accepted().is_some(),
            other_client_survives,
            "{on_reuse:?}"
        );
        let reasons: Vec<_> = h
            .sink
            .take()
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::FamilyRevoked { reason } => Some(reason),
                _ => None,
            })
            .collect();
        assert!(reasons.contains(&RevokeReason::ReuseDetected));
        assert!(reasons.contains(&RevokeReason::SubjectReuse));
    }
}

/// `report_only` denies the replay and reports it, revoking nothing.
#[test]
fn report_only_revokes_nothing() {
    let h = Harness::new(PolicyOverrides::new().on_reuse(OnReuse::ReportOnly));
    let t1 = h.issue();
    let t2 = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::ReuseDetected)
    );
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&t2, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
    let kinds: Vec<_> = h.sink.take().iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["reuse_detected"]);
}

/// Over `max_families_per_subject` the oldest family is revoked with an event.
#[test]
fn cap_evicts_the_oldest_family() {
    let h = Harness::new(PolicyOverrides::new().max_families_per_subject(2));
    let f1 = h.issue();
    h.advance(1);
    let f2 = h.issue();
    h.advance(1);
    let f3 = h.issue();
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&f1, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked)
    );
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&f2, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
    let f3 = h
        .engine
        .redeem(&RedeemRequest::new(&f3, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    let ev = h.sink.take();
    assert!(
        ev.iter()
            .any(|e| e.kind == EventKind::CapEviction { cap: 2 })
    );
    assert!(ev.iter().any(|e| e.kind
        == EventKind::FamilyRevoked {
            reason: RevokeReason::CapEviction
        }));
    // Other subjects are not counted.
    let _ = h.issue_for("bob");
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&f3, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
}

/// The cap counts only the capped client's families: another client's
/// families of the same subject neither count towards it nor get evicted.
#[test]
fn the_cap_counts_only_its_own_clients_families() {
    let set = PolicySet::builder()
        .client(CLIENT, PolicyOverrides::new().max_families_per_subject(2))
        .build()
        .unwrap();
    let h = Harness::with_set(set);
    let issue = |client: &str| {
        h.advance(1);
        h.engine
            .issue(&IssueRequest {
                client,
                subject: "alice",
                scope: "openid",
                ip: Some(ip("10.0.0.1")),
            })
            .unwrap()
            .accepted()
            .unwrap()
            .token
    };
    let app1 = issue(CLIENT);
    let web1 = issue("web");
    let web2 = issue("web");
    let app2 = issue(CLIENT);
    let redeems = |t: &Token, client: &str| {
        h.engine
            .redeem(&RedeemRequest::new(t, client).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason()
    };
    // Four families, two per client: under the cap of 2, nothing evicted.
    for (t, client) in [
        (&app1, CLIENT),
        (&web1, "web"),
        (&web2, "web"),
        (&app2, CLIENT),
    ] {
        let i = h.engine.introspect(t).unwrap();
        assert!(i.active, "{client} family evicted");
        assert_eq!(&*i.client, client);
    }
    let app3 = issue(CLIENT);
    assert_eq!(
        redeems(&app1, CLIENT),
        Some(DenyReason::Revoked),
        "oldest evicted"
    );
    for (t, client) in [
        (&web1, "web"),
        (&web2, "web"),
        (&app2, CLIENT),
        (&app3, CLIENT),
    ] {
        assert_eq!(redeems(t, client), None, "{client} family kept");
    }
}

/// Over the cap the oldest family by creation goes, however recently it
/// was used; more than one goes when the cap was lowered.
#[test]
fn cap_eviction_takes_the_oldest_created_first() {
    let capped = |n| {
        PolicySet::builder()
            .client(CLIENT, PolicyOverrides::new().max_families_per_subject(n))
            .build()
            .unwrap()
    };
    let h = Harness::with_set(capped(3));
    let f1 = h.issue();
    h.advance(1);
    let f2 = h.issue();
    h.advance(1);
    let f3 = h.issue();
    h.advance(1);
    // f1 is now the most recently used.
    let f1 = h
        .engine
        .redeem(&RedeemRequest::new(&f1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    h.advance(1);
    let f4 = h.issue();
    let status = |t: &Token| {
        h.engine
            .redeem(&RedeemRequest::new(t, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason()
    };
    assert_eq!(status(&f1), Some(DenyReason::Revoked));
    // Lower the cap to 1: the next issue evicts the two oldest left.
    h.engine.swap_policies(capped(1));
    h.advance(1);
    let f5 = h.issue();
    assert_eq!(status(&f2), Some(DenyReason::Revoked));
    assert_eq!(status(&f3), Some(DenyReason::Revoked));
    assert_eq!(status(&f4), Some(DenyReason::Revoked));
    assert_eq!(status(&f5), None);
}

/// Each rotation records the address it came from, and `grace_same_ip`
/// compares a replay with the latest rotation's address, not issuance's.
#[test]
fn each_rotation_records_its_address_for_grace_same_ip() {
    let h = Harness::new(
        PolicyOverrides::new()
            .grace_period(Duration::from_secs(10))
            .grace_same_ip(true),
    );
    let t1 = h.issue(); // from 10.0.0.1
    h.engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.2")))
        .unwrap()
        .accepted()
        .unwrap();
    h.advance(1);
    // The predecessor of t2 rotated from 10.0.0.2: a replay from the
    // issuing address is reuse...
    let from_issuer = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(from_issuer.deny_reason(), Some(DenyReason::ReuseDetected));
    // ...which revoked the family; start again to check the other side.
    let t1 = h.issue();
    let t2b = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.2")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    let t3 = h
        .engine
        .redeem(&RedeemRequest::new(&t2b, CLIENT).ip(ip("10.0.0.3")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    let replay = h
        .engine
        .redeem(&RedeemRequest::new(&t2b, CLIENT).ip(ip("10.0.0.3")))
        .unwrap();
    let a = replay
        .accepted()
        .expect("same address as the latest rotation");
    assert_eq!((a.kind, &a.token), (AcceptKind::GraceReplay, &t3));
}

/// Regression: the grace branch answered before the allow-list, so a spent
/// token replayed from outside the client's networks got the successor and
/// a fresh access token. A grace replay is a redemption: outside the list it
/// is `ip_not_allowed` with its event and no revocation.
#[test]
fn a_grace_replay_outside_the_allow_list_is_denied_with_its_event_and_no_revocation() {
    let h = Harness::new(
        PolicyOverrides::new()
            .grace_period(Duration::from_secs(10))
            .ip_allowlist(allow(&["10.0.0.0/8"])),
    );
    let t1 = h.issue();
    let t2 = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    h.advance(1);
    h.sink.take();
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("198.51.100.7")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::IpNotAllowed));
    let ev = h.sink.take();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].kind, EventKind::IpNotAllowed);
    assert_eq!(ev[0].ip, Some(ip("198.51.100.7")));
    // An unknown address is outside too.
    let d = h.engine.redeem(&RedeemRequest::new(&t1, CLIENT)).unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::IpNotAllowed));
    // Nothing revoked, no replay budget spent: from inside, the same
    // successor; and it still rotates.
    let a = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.9")))
        .unwrap()
        .accepted()
        .unwrap()
        .clone();
    assert_eq!((a.kind, a.token), (AcceptKind::GraceReplay, t2));
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&t2, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
}

/// Regression: a racing loser's `now` (read before the shard lock) could
/// precede the winner's rotation time, and `grace_period = 0s` then granted
/// it a replay. Zero grace means no replay, ever: the loser is reuse.
#[test]
fn zero_grace_denies_a_loser_whose_clock_precedes_the_rotation() {
    let h = Harness::new(PolicyOverrides::new());
    let t1 = h.issue();
    let now = h.engine.now();
    let later = Timestamp::from_millis(now.as_millis() + 5);
    let winner = h
        .engine
        .at(later)
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(winner.accepted().unwrap().kind, AcceptKind::Rotated);
    let loser = h
        .engine
        .at(now)
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(loser.deny_reason(), Some(DenyReason::ReuseDetected));
}

/// Revocation by subject (all clients or one) and by client.
#[test]
fn revoke_by_subject_and_client() {
    let h = Harness::new(PolicyOverrides::new());
    let issue = |client: &str, subject: &str| {
        h.engine
            .issue(&IssueRequest {
                client,
                subject,
                scope: "",
                ip: Some(ip("10.0.0.1")),
            })
            .unwrap()
            .accepted()
            .unwrap()
            .token
    };
    let a_m = issue(CLIENT, "alice");
    let a_w = issue("web", "alice");
    let b_m = issue(CLIENT, "bob");
    let b_w = issue("web", "bob");
    assert_eq!(h.engine.revoke_subject("alice", Some("web")).unwrap(), 1);
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&a_m, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&a_w, "web").ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked)
    );
    assert_eq!(h.engine.revoke_subject("alice", None).unwrap(), 1);
    assert_eq!(h.engine.revoke_subject("alice", None).unwrap(), 0);
    assert_eq!(h.engine.revoke_client("web").unwrap(), 1);
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&b_w, "web").ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked)
    );
    assert!(
        h.engine
            .redeem(&RedeemRequest::new(&b_m, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
}

/// Introspection reports the family and its expiries without touching it.
#[test]
fn introspection_has_no_side_effects() {
    let h = Harness::new(PolicyOverrides::new().idle_ttl(Some(Duration::from_secs(60))));
    let t1 = h.issue();
    h.advance(10);
    let i = h.engine.introspect(&t1).unwrap();
    assert!(i.active);
    assert_eq!(&*i.client, CLIENT);
    assert_eq!(&*i.subject, "alice");
    assert_eq!(&*i.scope, "openid offline_access");
    assert_eq!(i.generation, Generation::FIRST);
    assert_eq!(i.last_used, common::START);
    assert_eq!(
        i.idle_expires_at,
        Some(common::START.saturating_add(Duration::from_secs(60)))
    );
    assert_eq!(i.status, Status::Active);
    // Introspecting did not count as use.
    h.advance(50);
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::ExpiredIdle)
    );
    assert!(!h.engine.introspect(&t1).unwrap().active);
    assert!(h.engine.introspect("rgt_garbage").is_none());
}

/// A rotated-out token introspects as inactive.
#[test]
fn rotated_out_token_is_inactive() {
    let h = Harness::new(PolicyOverrides::new());
    let t1 = h.issue();
    let t2 = h
        .engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    assert!(!h.engine.introspect(&t1).unwrap().active);
    assert!(h.engine.introspect(&t2).unwrap().active);
}

/// The sweeper removes expired families and revoked ones after retention,
/// with bounded work per call.
#[test]
fn sweep_removes_expired_and_old_revoked_families() {
    let h = Harness::new(PolicyOverrides::new().idle_ttl(Some(Duration::from_secs(60))));
    let live: Vec<_> = (0..50).map(|i| h.issue_for(&format!("u{i}"))).collect();
    let revoked = h.issue_for("r");
    h.engine.revoke_token(&revoked, None).unwrap();
    h.advance(30);
    let keep: Vec<_> = live[..10]
        .iter()
        .map(|t| {
            h.engine
                .redeem(&RedeemRequest::new(t, CLIENT).ip(ip("10.0.0.1")))
                .unwrap()
                .accepted()
                .unwrap()
                .token
        })
        .collect();
    h.advance(40);
    let mut removed = 0;
    let mut calls = 0;
    loop {
        let r = h.engine.sweep(7).unwrap();
        assert!(r.examined <= 7);
        removed += r.removed;
        calls += 1;
        if calls > 2000 {
            break;
        }
    }
    assert_eq!(removed, 40, "the 40 idle families");
    assert_eq!(h.engine.stats().families, 11);
    for t in &keep {
        assert!(
            h.engine
                .redeem(&RedeemRequest::new(t, CLIENT).ip(ip("10.0.0.1")))
                .unwrap()
                .accepted()
                .is_some()
        );
    }
    // Revoked: still answers `revoked` until retention (1 day) passes.
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&revoked, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked)
    );
    h.advance(86_400);
    for _ in 0..2000 {
        h.engine.sweep(64).unwrap();
    }
    assert_eq!(h.engine.stats().families, 0, "idle after a day too");
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&revoked, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::InvalidToken)
    );
}

/// Churn: issuing and expiring families forever keeps the table bounded by
/// the live set, because swept slots are reused.
#[test]
fn memory_stays_bounded_under_churn() {
    let h = Harness::new(PolicyOverrides::new().idle_ttl(Some(Duration::from_secs(10))));
    for round in 0..20 {
        for i in 0..200 {
            h.issue_for(&format!("s{round}-{i}"));
        }
        h.advance(11);
        while h.engine.sweep(10_000).unwrap().removed > 0 {}
        assert_eq!(h.engine.stats().families, 0, "round {round}");
    }
}

/// Invalid arguments to issue are errors, not decisions.
#[test]
fn issue_rejects_bad_arguments() {
    let h = Harness::new(PolicyOverrides::new());
    let long = "x".repeat(2000);
    for (client, subject) in [("", "a"), ("c", ""), ("c", long.as_str())] {
        let e = h
            .engine
            .issue(&IssueRequest {
                client,
                subject,
                scope: "",
                ip: Some(ip("10.0.0.1")),
            })
            .unwrap_err();
        assert!(
            matches!(e, refresh_guard::Error::InvalidArgument { .. }),
            "{e}"
        );
    }
    assert_eq!(h.engine.stats().families, 0);
}

/// Stats count outcomes and events.
#[test]
fn stats_count_outcomes() {
    let h = Harness::new(PolicyOverrides::new());
    let t1 = h.issue();
    h.engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    h.engine
        .redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    h.engine
        .redeem(&RedeemRequest::new("junk", CLIENT).ip(ip("10.0.0.1")))
        .unwrap();
    let s = h.engine.stats();
    assert_eq!(s.outcome("issued"), 1);
    assert_eq!(s.outcome("rotated"), 1);
    assert_eq!(s.outcome("reuse_detected"), 1);
    assert_eq!(s.outcome("invalid_token"), 1);
    assert_eq!(s.events.get("reuse_detected"), 1);
    assert_eq!(s.events.get("family_revoked"), 1);
}

/// Regression guard for the tag cache: a key id removed and re-added with
/// other material must not keep verifying tokens of the old material.
#[test]
fn re_added_key_id_with_new_material_kills_old_tokens() {
    use refresh_guard::{KeyId, KeySecret};
    let h = Harness::new(PolicyOverrides::new());
    let t = h.issue();
    let mut ring = (*h.engine.key_ring()).clone();
    let old = ring.active();
    ring.add(KeyId(200), &KeySecret::from_bytes([1; 32]))
        .unwrap();
    ring.set_active(KeyId(200)).unwrap();
    ring.remove(old).unwrap();
    ring.add(old, &KeySecret::from_bytes([2; 32])).unwrap();
    h.engine.set_key_ring(ring);
    assert_eq!(
        h.engine
            .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::InvalidToken)
    );
}
