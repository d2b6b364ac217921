//! Event delivery: the sink is called outside every lock, so a slow or
//! panicking sink cannot corrupt the table or stall other families.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::ip;
use refresh_guard::RedeemRequest;
use refresh_guard::{
    DenyReason, Engine, Event, EventSink, IssueRequest, MemorySink, OnReuse, PolicyOverrides,
    PolicySet, RevokeReason, Token,
};

fn issue(e: &Engine, subject: &str) -> Token {
    e.issue(&IssueRequest {
        client: "app",
        subject,
        scope: "",
        ip: Some(ip("10.0.0.1")),
    })
    .unwrap()
    .accepted()
    .unwrap()
    .token
}

struct Panicking(AtomicUsize);

impl EventSink for Panicking {
    fn emit(&self, _: &Event) {
        self.0.fetch_add(1, Ordering::SeqCst);
        panic!("sink failure");
    }
}

/// A panicking sink: the redemption that raised the event still gets its
/// decision, the state change it made stands, and panics are counted.
#[test]
fn panicking_sink_is_contained() {
    let sink = Arc::new(Panicking(AtomicUsize::new(0)));
    let e = Engine::builder().events(sink.clone()).build().unwrap();
    let t1 = issue(&e, "alice");
    let t2 = e
        .redeem(&RedeemRequest::new(&t1, "app").ip(ip("10.0.0.1")))
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    let d = e
        .redeem(&RedeemRequest::new(&t1, "app").ip(ip("10.0.0.1")))
        .unwrap();
    assert_eq!(d.deny_reason(), Some(DenyReason::ReuseDetected));
    assert_eq!(
        e.redeem(&RedeemRequest::new(&t2, "app").ip(ip("10.0.0.1")))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked),
        "the revocation happened despite the sink"
    );
    let other = issue(&e, "bob");
    assert!(
        e.redeem(&RedeemRequest::new(&other, "app").ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .is_some()
    );
    let stats = e.stats();
    assert_eq!(
        stats.events.sink_panics,
        sink.0.load(Ordering::SeqCst) as u64
    );
    assert!(stats.events.sink_panics >= 2);
    assert_eq!(stats.events.get("reuse_detected"), 1);
}

struct Slow;

impl EventSink for Slow {
    fn emit(&self, _: &Event) {
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A slow sink slows only the caller whose decision raised the event: other
/// families (even in the same shard) are redeemed meanwhile.
#[test]
fn slow_sink_does_not_hold_locks() {
    let e = Engine::builder().events(Slow).shards(1).build().unwrap();
    let victim = issue(&e, "alice");
    let mut others: Vec<Token> = (0..50).map(|i| issue(&e, &format!("u{i}"))).collect();
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            barrier.wait();
            // Outside the allow-list? No list; use client mismatch: an event.
            let d = e
                .redeem(&RedeemRequest::new(&victim, "intruder").ip(ip("10.0.0.1")))
                .unwrap();
            assert_eq!(d.deny_reason(), Some(DenyReason::ClientMismatch));
        });
        barrier.wait();
        std::thread::sleep(Duration::from_millis(30));
        let start = Instant::now();
        for t in others.iter_mut() {
            *t = e
                .redeem(&RedeemRequest::new(t, "app").ip(ip("10.0.0.1")))
                .unwrap()
                .accepted()
                .unwrap()
                .token;
        }
        assert!(
            start.elapsed() < Duration::from_millis(200),
            "redemptions waited for the sink: {:?}",
            start.elapsed()
        );
    });
}

/// Without a sink events are only counted, and the engine skips gathering
/// what they would carry; the responses they accompany still happen in
/// full, counted the same, from any number of threads.
#[test]
fn without_a_sink_events_are_counted_and_responses_applied() {
    use refresh_guard::{IpRange, OnReuse, PolicyOverrides, PolicySet};
    let allow: Vec<IpRange> = vec!["10.0.0.0/8".parse().unwrap()];
    let set = PolicySet::builder()
        .defaults(
            PolicyOverrides::new()
                .on_reuse(OnReuse::RevokeSubject)
                .ip_allowlist(allow),
        )
        .build()
        .unwrap();
    let e = Engine::builder().policies(set).build().unwrap();
    let rotate = |t: &Token| {
        e.redeem(&RedeemRequest::new(t, "app").ip(ip("10.0.0.1")))
            .unwrap()
            .accepted()
            .unwrap()
            .token
    };
    const THREADS: usize = 4;
    std::thread::scope(|s| {
        for n in 0..THREADS {
            let (e, rotate) = (&e, &rotate);
            s.spawn(move || {
                let subject = format!("user-{n}");
                let (stolen, sibling) = (issue(e, &subject), issue(e, &subject));
                let outside = e
                    .redeem(&RedeemRequest::new(&sibling, "app").ip(ip("192.0.2.1")))
                    .unwrap();
                assert_eq!(outside.deny_reason(), Some(DenyReason::IpNotAllowed));
                let mismatch = e
                    .redeem(&RedeemRequest::new(&sibling, "other").ip(ip("10.0.0.1")))
                    .unwrap();
                assert_eq!(mismatch.deny_reason(), Some(DenyReason::ClientMismatch));
                rotate(&stolen);
                let reuse = e
                    .redeem(&RedeemRequest::new(&stolen, "app").ip(ip("10.0.0.1")))
                    .unwrap();
                assert_eq!(reuse.deny_reason(), Some(DenyReason::ReuseDetected));
                // The subject-wide response reached the sibling family.
                let after = e
                    .redeem(&RedeemRequest::new(&sibling, "app").ip(ip("10.0.0.1")))
                    .unwrap();
                assert_eq!(after.deny_reason(), Some(DenyReason::Revoked));
            });
        }
    });
    let n = THREADS as u64;
    let events = e.stats().events;
    for (kind, want) in [
        ("ip_not_allowed", n),
        ("client_mismatch", n),
        ("reuse_detected", n),
        // The reused family, then its sibling by the subject response.
        ("family_revoked", 2 * n),
    ] {
        assert_eq!(events.get(kind), want, "{kind}");
    }
    // Nothing of the subjects is left to revoke.
    assert_eq!(e.revoke_subject("user-0", None).unwrap(), 0);
}

/// The engine counts revocations by reason itself, with or without a sink,
/// so an embedder reads them from `stats()` instead of counting events.
#[test]
fn revocations_are_counted_by_reason_with_or_without_a_sink() {
    let set = PolicySet::builder()
        .defaults(PolicyOverrides::new().on_reuse(OnReuse::RevokeSubject))
        .build()
        .unwrap();
    let sink = Arc::new(MemorySink::new());
    let quiet = Engine::builder().policies(set.clone()).build().unwrap();
    let heard = Engine::builder()
        .policies(set)
        .events(sink.clone())
        .build()
        .unwrap();
    for e in [&quiet, &heard] {
        // Reuse revokes the family and, by policy, its sibling.
        let (stolen, _sibling) = (issue(e, "alice"), issue(e, "alice"));
        e.redeem(&RedeemRequest::new(&stolen, "app").ip(ip("10.0.0.1")))
            .unwrap();
        e.redeem(&RedeemRequest::new(&stolen, "app").ip(ip("10.0.0.1")))
            .unwrap();
        // Three of bob's families revoked on request, one by token.
        for _ in 0..3 {
            issue(e, "bob");
        }
        assert_eq!(e.revoke_subject("bob", None).unwrap(), 3);
        let carol = issue(e, "carol");
        assert!(e.revoke_token(&carol, Some("app")).unwrap());
        let events = e.stats().events;
        for (reason, want) in [
            (RevokeReason::ReuseDetected, 1),
            (RevokeReason::SubjectReuse, 1),
            (RevokeReason::SubjectRevoked, 3),
            (RevokeReason::Requested, 1),
            (RevokeReason::CodeReplay, 0),
        ] {
            assert_eq!(events.revoked(reason), want, "{reason}");
        }
        assert_eq!(events.revocations.iter().sum::<u64>(), 6);
        assert_eq!(events.get("family_revoked"), 6);
    }
    let delivered = sink
        .take()
        .into_iter()
        .filter(|e| e.kind.as_str() == "family_revoked")
        .count();
    assert_eq!(delivered, 6);
}
