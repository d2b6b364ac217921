//! `decide` + [`apply`] against a reference written as straight-line rules
//! from the README's "The order of checks" and "Policy knobs", over random
//! family states, requests and policies: the same verdict, the same record
//! afterwards, the same revocations and the same events. The engine-level
//! model test (tests/model/) checks the shell around them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestError, TestRunner};

use super::*;
use crate::family::RevokeReason;
use crate::policy::{AllowList, IpRange, OnReuse};
use crate::token::{KeyId, KeyUid};

/// The addresses requests and rotations come from: inside and outside
/// `10.0.0.0/8`, one spelled IPv4-mapped, IPv6, and unknown.
const IPS: [Option<&str>; 6] = [
    None,
    Some("10.0.0.1"),
    Some("10.0.0.2"),
    Some("::ffff:10.0.0.1"),
    Some("192.0.2.7"),
    Some("2001:db8::1"),
];
const ON_REUSE: [OnReuse; 4] = [
    OnReuse::RevokeFamily,
    OnReuse::RevokeSubjectClient,
    OnReuse::RevokeSubject,
    OnReuse::ReportOnly,
];
/// The key the engine mints new generations with.
const ACTIVE: KeyId = KeyId(1);

fn ip(i: usize) -> Option<IpAddr> {
    IPS[i].map(|s| s.parse().expect("a valid address literal"))
}

/// Policies, in whole seconds so that boundaries are hit.
#[derive(Clone, Debug)]
struct Pol {
    reuse: bool,
    grace: u64,
    max_replays: u8,
    same_ip: bool,
    on_reuse: OnReuse,
    idle: Option<u64>,
    absolute: Option<u64>,
    /// The allow-list is `10.0.0.0/8` rather than any.
    restricted: bool,
    every_refresh: bool,
}

impl Pol {
    fn build(&self) -> ClientPolicy {
        ClientPolicy {
            rotation: if self.reuse {
                Rotation::Reuse
            } else {
                Rotation::Rotate
            },
            grace_period: Duration::from_secs(self.grace),
            grace_max_replays: self.max_replays,
            grace_same_ip: self.same_ip,
            on_reuse: self.on_reuse,
            idle_ttl: self.idle.map(Duration::from_secs),
            absolute_ttl: self.absolute.map(Duration::from_secs),
            ip_allowlist: if self.restricted {
                let ten: IpRange = "10.0.0.0/8".parse().expect("a valid CIDR");
                AllowList::new(&[ten])
            } else {
                AllowList::any()
            },
            ip_check: if self.every_refresh {
                IpCheck::EveryRefresh
            } else {
                IpCheck::IssuanceOnly
            },
            ..ClientPolicy::default()
        }
    }
}

/// A family's state as the rules read it, and the request.
#[derive(Clone, Debug)]
struct Case {
    current: u32,
    presented: u32,
    revoked: bool,
    created: u64,
    last_used: u64,
    rotated_at: u64,
    grace_used: u8,
    rotation_ip: usize,
    other_client: bool,
    ip: usize,
    now: u64,
    pol: Pol,
}

impl Case {
    fn family(&self) -> Family {
        let mut f = Family {
            generation: Generation::new(self.current),
            created: Timestamp::from_secs(self.created),
            last_used: Timestamp::from_secs(self.last_used),
            rotated_at: Timestamp::from_secs(self.rotated_at),
            grace_used: self.grace_used,
            rotation_ip: ip(self.rotation_ip),
            ..Family::for_test(FamilyId::from_bytes([1; 16]))
        };
        if self.revoked {
            f.revoke(
                RevokeReason::Requested,
                Timestamp::from_secs(self.rotated_at),
            );
        }
        f
    }

    fn request(&self) -> Request<'static> {
        Request {
            generation: Generation::new(self.presented),
            client: if self.other_client { "d" } else { "c" },
            ip: ip(self.ip),
            // DPoP binding has its own property test (tests/dpop.rs).
            jkt: None,
            now: Timestamp::from_secs(self.now),
        }
    }
}

/// The record fields a decision may change.
#[derive(Clone, Debug, PartialEq, Eq)]
struct After {
    generation: u32,
    last_used: u64,
    rotated_at: u64,
    grace_used: u8,
    rotation_ip: Option<IpAddr>,
    key: KeyId,
    tag_uid: KeyUid,
}

impl After {
    fn of(f: &Family) -> After {
        After {
            generation: f.generation.get(),
            last_used: f.last_used.as_secs(),
            rotated_at: f.rotated_at.as_secs(),
            grace_used: f.grace_used,
            rotation_ip: f.rotation_ip,
            key: f.key,
            tag_uid: f.tag_uid,
        }
    }
}

/// What the reference expects: the verdict, the record afterwards, the
/// family's own revocation, the reach across the subject (client only?),
/// the events.
type Expected = (
    Verdict,
    After,
    Option<RevokeReason>,
    Option<(bool, RevokeReason)>,
    Vec<Signal>,
);

fn same_host(a: Option<IpAddr>, b: Option<IpAddr>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.to_canonical() == b.to_canonical(),
        _ => false,
    }
}

fn in_ten(a: Option<IpAddr>) -> bool {
    matches!(a.map(|a| a.to_canonical()), Some(IpAddr::V4(v4)) if v4.octets()[0] == 10)
}

/// The rules, one after the other.
fn reference(c: &Case) -> Expected {
    let p = &c.pol;
    let (g, cur) = (c.presented, c.current);
    let req_ip = ip(c.ip);
    let before = After::of(&c.family());
    let deny = |r, events: Vec<Signal>| (Verdict::Deny(r), before.clone(), None, None, events);
    if c.other_client {
        return deny(DenyReason::ClientMismatch, vec![Signal::ClientMismatch]);
    }
    if c.revoked {
        return deny(DenyReason::Revoked, vec![]);
    }
    if p.absolute.is_some_and(|t| c.now >= c.created + t) {
        return deny(DenyReason::ExpiredAbsolute, vec![]);
    }
    if p.idle.is_some_and(|t| c.now >= c.last_used + t) {
        return deny(DenyReason::ExpiredIdle, vec![]);
    }
    if g > cur {
        let rollback = Signal::StateRollback {
            presented: Generation::new(g),
            current: Generation::new(cur),
        };
        return deny(DenyReason::StateRollback, vec![rollback]);
    }
    let ip_ok = !p.every_refresh || !p.restricted || in_ten(req_ip);
    let ip_denied = || deny(DenyReason::IpNotAllowed, vec![Signal::IpNotAllowed]);
    let mut after = before.clone();
    after.last_used = c.now.max(c.last_used);
    if g < cur {
        // The window counts from the rotation, even for a `now` before it.
        let grace = g >= 1
            && g + 1 == cur
            && c.now.max(c.rotated_at) < c.rotated_at + p.grace
            && c.grace_used < p.max_replays
            && (!p.same_ip || same_host(req_ip, ip(c.rotation_ip)));
        if !grace {
            let (own, subject) = match p.on_reuse {
                OnReuse::RevokeFamily => (Some(RevokeReason::ReuseDetected), None),
                OnReuse::RevokeSubjectClient => (
                    Some(RevokeReason::ReuseDetected),
                    Some((true, RevokeReason::SubjectReuse)),
                ),
                OnReuse::RevokeSubject => (
                    Some(RevokeReason::ReuseDetected),
                    Some((false, RevokeReason::SubjectReuse)),
                ),
                OnReuse::ReportOnly => (None, None),
            };
            let reuse = Signal::ReuseDetected {
                presented: Generation::new(g),
                current: Generation::new(cur),
                response: p.on_reuse,
            };
            let verdict = Verdict::Deny(DenyReason::ReuseDetected);
            return (verdict, before, own, subject, vec![reuse]);
        }
        if !ip_ok {
            return ip_denied();
        }
        after.grace_used += 1;
        return (
            Verdict::Accept(AcceptKind::GraceReplay),
            after,
            None,
            None,
            vec![],
        );
    }
    if !ip_ok {
        return ip_denied();
    }
    if p.reuse {
        return (Verdict::Accept(AcceptKind::Kept), after, None, None, vec![]);
    }
    if cur == u32::MAX {
        return deny(DenyReason::GenerationsExhausted, vec![]);
    }
    after.generation = cur + 1;
    after.rotated_at = c.now.max(c.rotated_at);
    after.rotation_ip = req_ip.map(|a| a.to_canonical());
    after.grace_used = 0;
    after.key = ACTIVE;
    after.tag_uid = KeyUid::NONE;
    (
        Verdict::Accept(AcceptKind::Rotated),
        after,
        None,
        None,
        vec![],
    )
}

fn pol() -> impl Strategy<Value = Pol> {
    (
        (
            any::<bool>(),
            prop::sample::select(vec![0u64, 10, 30]),
            0u8..3,
        ),
        (any::<bool>(), prop::sample::select(ON_REUSE.to_vec())),
        (
            prop::option::of(prop::sample::select(vec![60u64, 300])),
            prop::option::of(prop::sample::select(vec![120u64, 400])),
        ),
        (any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |((reuse, grace, max_replays), (same_ip, on_reuse), (idle, absolute), (r, e))| Pol {
                reuse,
                grace,
                max_replays,
                same_ip,
                on_reuse,
                idle,
                absolute,
                restricted: r,
                every_refresh: e,
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    let current = prop_oneof![
        6 => 0u32..5,
        1 => Just(u32::MAX),
        1 => Just(u32::MAX - 1),
    ];
    // The presented generation relative to the current one: the same, its
    // predecessor, older, newer.
    let offset = prop_oneof![4 => Just(0i64), 3 => Just(-1), 2 => -4i64..-1, 1 => 1i64..3];
    (
        (current, offset),
        (prop::bool::weighted(0.1), prop::bool::weighted(0.1)),
        (0u64..200, 0u64..200, 0u8..4),
        (0..IPS.len(), 0..IPS.len()),
        (0u64..500, pol()),
    )
        .prop_map(
            |(
                (current, offset),
                (revoked, other_client),
                (last, rotated, grace_used),
                (rotation_ip, ip),
                (now, pol),
            )| {
                let created = 1000;
                let presented = u32::try_from(i64::from(current) + offset).unwrap_or(current);
                Case {
                    current,
                    presented,
                    revoked,
                    created,
                    last_used: created + last,
                    rotated_at: created + rotated,
                    grace_used,
                    rotation_ip,
                    other_client,
                    ip,
                    // Some requests read the clock before the last writer.
                    now: created - 50 + now,
                    pol,
                }
            },
        )
}

/// Runs `decide`, then `apply` as the engine does, and what the plan says.
fn actual(c: &Case) -> Expected {
    let mut f = c.family();
    let req = c.request();
    let plan = decide(&f, &req, &c.pol.build());
    apply(&mut f, plan.change, req.now, req.ip, ACTIVE);
    (
        plan.verdict,
        After::of(&f),
        plan.cascade.family(),
        plan.cascade.subject(),
        plan.events.iter().collect(),
    )
}

fn label(e: &Expected) -> String {
    let verdict = match e.0 {
        Verdict::Accept(k) => k.as_str(),
        Verdict::Deny(r) => r.as_str(),
    };
    match (e.2, e.3) {
        (_, Some((true, _))) => format!("{verdict}:subject_client"),
        (_, Some((false, _))) => format!("{verdict}:subject"),
        (Some(_), None) => format!("{verdict}:family"),
        (None, None) if !e.4.is_empty() && e.0 == Verdict::Deny(DenyReason::ReuseDetected) => {
            format!("{verdict}:report_only")
        }
        (None, None) => verdict.to_owned(),
    }
}

/// `decide` + `apply` agree with the reference on every outcome, and the
/// strategy reaches every outcome (each `on_reuse` response included).
#[test]
fn decide_and_apply_match_the_reference() {
    let mut runner = TestRunner::new(Config {
        cases: 4096,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        ..Config::default()
    });
    let seen = RefCell::new(BTreeMap::<String, u32>::new());
    let result = runner.run(&case(), |c| {
        let want = reference(&c);
        *seen.borrow_mut().entry(label(&want)).or_default() += 1;
        prop_assert_eq!(actual(&c), want);
        Ok(())
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, c)) => panic!("{why}\nminimal failing case: {c:#?}"),
        Err(e) => panic!("{e}"),
    }
    let seen = seen.into_inner();
    let must = [
        "rotated",
        "kept",
        "grace_replay",
        "client_mismatch",
        "revoked",
        "expired_absolute",
        "expired_idle",
        "state_rollback",
        "ip_not_allowed",
        "generations_exhausted",
        "reuse_detected:family",
        "reuse_detected:subject_client",
        "reuse_detected:subject",
        "reuse_detected:report_only",
    ];
    let missing: Vec<_> = must.iter().filter(|m| !seen.contains_key(**m)).collect();
    assert!(missing.is_empty(), "never reached {missing:?}: {seen:#?}");
}
