//! Redeeming an existing family allocates nothing: a counting global
//! allocator watches this test binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::IpAddr;
use std::time::Duration;

use refresh_guard::RedeemRequest;
use refresh_guard::{AcceptKind, Engine, IssueRequest, PolicyOverrides, PolicySet};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations<R>(f: impl FnOnce() -> R) -> (usize, R) {
    let before = ALLOCS.with(|c| c.get());
    let r = f();
    (ALLOCS.with(|c| c.get()) - before, r)
}

/// Rotation, grace replay, `reuse` rotation and the common denials of an
/// existing family allocate nothing.
#[test]
fn redeem_of_existing_family_does_not_allocate() {
    let set = PolicySet::builder()
        .defaults(
            PolicyOverrides::new()
                .grace_period(Duration::from_secs(30))
                .ip_allowlist(vec!["10.0.0.0/8".parse().unwrap()]),
        )
        .client(
            "keeper",
            PolicyOverrides::new().rotation(refresh_guard::Rotation::Reuse),
        )
        .build()
        .unwrap();
    let engine = Engine::builder().policies(set).build().unwrap();
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let issue = |client| {
        engine
            .issue(&IssueRequest {
                client,
                subject: "alice",
                scope: "openid",
                ip: Some(ip),
            })
            .unwrap()
            .accepted()
            .unwrap()
            .token
    };
    let (n, mut tok) = allocations(|| issue("app"));
    assert!(
        n > 0,
        "the counter sees allocations (issue interns and inserts)"
    );
    // Warm up: thread-local state of arc-swap and the first touch of a shard.
    for _ in 0..3 {
        tok = engine
            .redeem(&RedeemRequest::new(&tok, "app").ip(ip))
            .unwrap()
            .accepted()
            .unwrap()
            .token;
    }
    let prev = tok;
    let (n, d) = allocations(|| {
        engine
            .redeem(&RedeemRequest::new(&prev, "app").ip(ip))
            .unwrap()
    });
    let next = d.accepted().unwrap();
    assert_eq!(next.kind, AcceptKind::Rotated);
    assert_eq!(n, 0, "rotation allocated");

    let (n, d) = allocations(|| {
        engine
            .redeem(&RedeemRequest::new(&prev, "app").ip(ip))
            .unwrap()
    });
    assert_eq!(d.accepted().unwrap().kind, AcceptKind::GraceReplay);
    assert_eq!(n, 0, "grace replay allocated");

    let (n, d) = allocations(|| {
        engine
            .redeem(
                &RedeemRequest::new(&next.token, "app").ip("192.0.2.1".parse::<IpAddr>().unwrap()),
            )
            .unwrap()
    });
    assert_eq!(
        d.deny_reason(),
        Some(refresh_guard::DenyReason::IpNotAllowed)
    );
    // The denial's event is built outside the hot path and may allocate;
    // the decision itself must not. Denials with events are excluded here.
    let _ = n;

    let (n, d) = allocations(|| {
        engine
            .redeem(&RedeemRequest::new("rgt_not-a-token", "app").ip(ip))
            .unwrap()
    });
    assert!(d.deny_reason().is_some());
    assert_eq!(n, 0, "malformed token allocated");

    let mut forged = next.token.as_str().to_owned();
    forged.replace_range(20..21, if &forged[20..21] == "A" { "B" } else { "A" });
    let (n, d) = allocations(|| {
        engine
            .redeem(&RedeemRequest::new(&forged, "app").ip(ip))
            .unwrap()
    });
    assert_eq!(
        d.deny_reason(),
        Some(refresh_guard::DenyReason::InvalidToken)
    );
    assert_eq!(n, 0, "forged token allocated");

    let kept = issue("keeper");
    engine
        .redeem(&RedeemRequest::new(&kept, "keeper").ip(ip))
        .unwrap()
        .accepted()
        .unwrap();
    let (n, d) = allocations(|| {
        engine
            .redeem(&RedeemRequest::new(&kept, "keeper").ip(ip))
            .unwrap()
    });
    assert_eq!(d.accepted().unwrap().kind, AcceptKind::Kept);
    assert_eq!(n, 0, "reuse rotation allocated");
}

/// An acceptance carries the family's subject, scope and client for the
/// token response; for a subject too long to be kept inline (a shared
/// string) handing it out must stay a reference-count bump, not a copy, so
/// a rotation still allocates nothing. This broke when the acceptance
/// started carrying the subject while long subjects were boxed.
#[test]
fn redeem_with_long_subject_does_not_allocate() {
    let engine = Engine::builder().build().unwrap();
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let subject = "a-subject-far-longer-than-the-inline-twenty-two-bytes";
    let mut tok = engine
        .issue(&IssueRequest {
            client: "app",
            subject,
            scope: "openid offline_access",
            ip: Some(ip),
        })
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    // Warm up, as above.
    for _ in 0..3 {
        tok = engine
            .redeem(&RedeemRequest::new(&tok, "app").ip(ip))
            .unwrap()
            .accepted()
            .unwrap()
            .token;
    }
    let (n, d) = allocations(|| {
        engine
            .redeem(&RedeemRequest::new(&tok, "app").ip(ip))
            .unwrap()
    });
    assert_eq!(n, 0, "rotation with a long subject allocated");
    let a = d.accepted().unwrap();
    assert_eq!(a.kind, AcceptKind::Rotated);
    assert_eq!(a.subject(), subject);
    assert_eq!(a.scope(), "openid offline_access");
    assert_eq!(a.client(), "app");
    // Dropping the acceptance gives the counts back: no leak, no copy.
    let (n, ()) = allocations(|| drop(d));
    assert_eq!(n, 0);
}

/// A DPoP-bound family's rotation and grace replay allocate nothing
/// either: binding allocates once (its own grant), checking never.
#[test]
fn redeem_of_a_dpop_bound_family_does_not_allocate() {
    use refresh_guard::{Dpop, Jkt};
    let set = PolicySet::builder()
        .client(
            "spa",
            PolicyOverrides::new()
                .dpop(Dpop::Required)
                .grace_period(Duration::from_secs(30)),
        )
        .build()
        .unwrap();
    let engine = Engine::builder().policies(set).build().unwrap();
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let key = Jkt::from_bytes([0xa1; 32]);
    let mut tok = engine
        .issue(&IssueRequest {
            client: "spa",
            subject: "alice",
            scope: "openid",
            ip: Some(ip),
        })
        .unwrap()
        .accepted()
        .unwrap()
        .token;
    let redeem = |t: &str| {
        engine
            .redeem(&RedeemRequest::new(t, "spa").ip(ip).dpop(key))
            .unwrap()
    };
    // The first proof binds (one allocation); then warm up.
    let (n, d) = allocations(|| redeem(&tok));
    assert!(n > 0, "binding allocates the family's own grant");
    tok = d.accepted().unwrap().token;
    for _ in 0..3 {
        tok = redeem(&tok).accepted().unwrap().token;
    }
    let prev = tok;
    let (n, d) = allocations(|| redeem(&prev));
    assert_eq!(d.accepted().unwrap().kind, AcceptKind::Rotated);
    assert_eq!(n, 0, "bound rotation allocated");
    let (n, d) = allocations(|| redeem(&prev));
    assert_eq!(d.accepted().unwrap().kind, AcceptKind::GraceReplay);
    assert_eq!(n, 0, "bound grace replay allocated");
}

/// Verifying an opaque access token allocates nothing for short client
/// ids, subjects and scopes, narrowed or not.
#[test]
fn verify_access_token_does_not_allocate() {
    let engine = Engine::builder().build().unwrap();
    let a = engine
        .issue(&IssueRequest {
            client: "app",
            subject: "alice",
            scope: "openid profile email",
            ip: None,
        })
        .unwrap()
        .accepted()
        .unwrap()
        .clone();
    let full = engine.access_token(&a, None).unwrap().token;
    let narrowed = engine.access_token(&a, Some("email")).unwrap().token;
    let _ = engine.verify_access_token(&full).unwrap();
    for t in [full, narrowed] {
        let (n, info) = allocations(|| engine.verify_access_token(&t));
        assert!(info.is_some());
        assert_eq!(n, 0, "verify allocated {n} times");
    }
    let (n, info) = allocations(|| engine.verify_access_token("rga_nonsense"));
    assert!(info.is_none());
    assert_eq!(n, 0);
}
