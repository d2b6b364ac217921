//! Model-based property test: random sequences of operations run against a
//! real [`Engine`] and against a plain reference model written from the
//! README's "The order of checks" and docs/design.md ("The refresh
//! decision", and "Policies": evaluated at redemption time, keyed by the
//! family's client). Every decision, revocation count, sweep result,
//! event and introspection must agree with the model.
//!
//! Families are born two ways: issued directly (generation 1), or as an
//! authorization code (generation 0) that an exchange turns into generation
//! 1 (issue 4). The model holds the PKCE rules of RFC 7636 as the crate
//! documents them (challenge checked at authorize, then at the exchange in
//! the order client, revoked, already exchanged, redirect URI, code TTL,
//! PKCE, allow-list), code replay (RFC 6749 §4.1.2: the family born from
//! the code is revoked only by a replay that passes the redirect URI, code
//! TTL and PKCE checks under the policy in force; any other replay is a
//! plain `code_spent` denial), and the sweeping of unused codes.
//!
//! A family's record can be backed up and restored (`Engine::family_record`,
//! `Engine::restore_family`): the family is then as it was at the backup,
//! and tokens minted since are newer than it, denied `state_rollback` with
//! an event (README "The order of checks", `g > c`).
//!
//! Fixtures and the tests are here; the reference model is in `reference`,
//! the strategy in `strategies`, the check loop in `runner`, and the paths
//! a run must reach in `coverage`. Saved failing cases are in
//! `main.proptest-regressions`, beside this file (proptest looks next to
//! the source file of the test).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{
    Config, FileFailurePersistence, TestCaseError, TestCaseResult, TestError, TestRunner,
};
use refresh_guard::RedeemRequest;
use refresh_guard::{
    AcceptKind, AuthorizeRequest, Decision, DenyReason, Engine, EventKind, ExchangeRequest,
    FamilyId, FamilyRecord, Generation, Introspection, IpCheck, IpRange, IssueRequest, ManualClock,
    MemorySink, OnReuse, Pkce, PolicyOverrides, PolicySet, PolicyVersion, RevokeReason, Rotation,
    Status, TOKEN_LEN, Timestamp,
};
use sha2::{Digest, Sha256};

mod coverage;
#[cfg(feature = "redis")]
#[path = "../redis_support/mod.rs"]
mod redis_support;
mod reference;
mod runner;
mod strategies;

use coverage::*;
use reference::*;
use runner::*;
use strategies::*;

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

const CLIENTS: [&str; 3] = ["app-a", "app-b", "app-c"];
/// A client that owns no family: presenting anything with it is a mismatch.
const INTRUDER: &str = "intruder";
const SUBJECTS: [&str; 3] = ["alice", "bob", "carol"];
const SCOPE: &str = "openid offline_access";

/// Test addresses, and whether [`ALLOWLIST`] admits each. The last is the
/// first written IPv4-mapped: the same client IP in another spelling.
const IPS: [(&str, bool); 9] = [
    ("10.0.0.1", true),
    ("10.20.30.40", true),
    ("192.0.2.15", true),
    ("2001:db8::7", true),
    ("::ffff:10.9.9.9", true),
    ("203.0.113.7", false),
    ("192.0.2.21", false),
    ("2001:db9::1", false),
    ("::ffff:10.0.0.1", true),
];
/// The restricted allow-list some policies carry.
const ALLOWLIST: [&str; 3] = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.10-192.0.2.20"];

const START_MS: u64 = 1_700_000_000_000;
const GRACE_MS: u64 = 10_000;
const IDLE_MS: u64 = 3_600_000;
const ABSOLUTE_MS: u64 = 86_400_000;
/// The engine's `revoked_retention`, set explicitly so sweeps are exact.
const RETENTION_MS: u64 = 2 * 3_600_000;
/// Few shards, so that [`FULL_SWEEP`] covers the whole table cheaply.
const SHARDS: usize = 4;
/// A sweep budget larger than every slot of every shard a case can create
/// (at most one slot per family ever issued, plus one per empty shard).
const FULL_SWEEP: usize = 4096;
const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// RFC 7636 §4.1: the characters of a code verifier.
const VERIFIER_CHARS: &[u8; 66] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~";
/// RFC 7636 Appendix B.
const RFC7636_VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const RFC7636_CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
/// Redirect URIs a code can be bound to. The last differs from the first
/// only by a trailing slash: RFC 6749 §4.1.3 wants the identical string.
const REDIRECTS: [&str; 3] = [
    "https://app.example/cb",
    "com.example.app:/oauth2redirect",
    "https://app.example/cb/",
];
/// Code TTLs the policies pick from besides random ones (≤ 10 min).
const CODE_TTLS: [u64; 5] = [1_000, 5_000, 10_000, 60_000, 600_000];

fn ip_addr(ip: usize) -> IpAddr {
    IPS[ip].0.parse().expect("test IPs parse")
}

/// Whether two test addresses are the same IP (an IPv4-mapped IPv6
/// address is its IPv4 address, as the allow-list treats it).
fn same_ip(a: usize, b: usize) -> bool {
    ip_addr(a).to_canonical() == ip_addr(b).to_canonical()
}

fn ts(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

/// The knobs the model varies for one client (everything else is default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PolicySpec {
    rotate: bool,
    /// Grace period 10 s, else 0 s.
    grace: bool,
    grace_max_replays: u8,
    grace_same_ip: bool,
    on_reuse: OnReuse,
    /// Idle TTL 1 h, else none.
    idle: bool,
    /// Absolute TTL 1 d, else none.
    absolute: bool,
    /// [`ALLOWLIST`], else any address.
    restricted: bool,
    every_refresh: bool,
    pkce: Pkce,
    /// `code_ttl`, 1 ms ..= 10 min.
    code_ttl_ms: u64,
}

impl PolicySpec {
    fn grace_ms(&self) -> u64 {
        if self.grace { GRACE_MS } else { 0 }
    }

    fn idle_ms(&self) -> Option<u64> {
        self.idle.then_some(IDLE_MS)
    }

    fn absolute_ms(&self) -> Option<u64> {
        self.absolute.then_some(ABSOLUTE_MS)
    }

    fn allows(&self, ip: usize) -> bool {
        !self.restricted || IPS[ip].1
    }

    fn overrides(&self) -> PolicyOverrides {
        let allowlist: Vec<IpRange> = if self.restricted {
            ALLOWLIST
                .iter()
                .map(|e| e.parse().expect("entry"))
                .collect()
        } else {
            Vec::new()
        };
        PolicyOverrides::new()
            .rotation(if self.rotate {
                Rotation::Rotate
            } else {
                Rotation::Reuse
            })
            .grace_period(Duration::from_millis(self.grace_ms()))
            .grace_max_replays(self.grace_max_replays)
            .grace_same_ip(self.grace_same_ip)
            .on_reuse(self.on_reuse)
            .idle_ttl(self.idle_ms().map(Duration::from_millis))
            .absolute_ttl(self.absolute_ms().map(Duration::from_millis))
            .ip_allowlist(allowlist)
            .ip_check(if self.every_refresh {
                IpCheck::EveryRefresh
            } else {
                IpCheck::IssuanceOnly
            })
            .pkce(self.pkce)
            .code_ttl(Duration::from_millis(self.code_ttl_ms))
    }
}

/// A policy set: defaults plus an optional own policy per client.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SetSpec {
    defaults: PolicySpec,
    clients: [Option<PolicySpec>; 3],
}

impl SetSpec {
    fn policy(&self, client: usize) -> &PolicySpec {
        self.clients[client].as_ref().unwrap_or(&self.defaults)
    }

    fn build(&self) -> PolicySet {
        let mut b = PolicySet::builder().defaults(self.defaults.overrides());
        for (name, spec) in CLIENTS.iter().zip(&self.clients) {
            if let Some(spec) = spec {
                b = b.client(*name, spec.overrides());
            }
        }
        b.build().expect("test policy sets are valid")
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// The engine agrees with the reference model (README "The order of checks",
/// docs/design.md "The refresh decision" and "Policies") on every
/// decision, revocation, sweep, event and introspection over random
/// operation sequences, and the strategy reaches every interesting path.
#[test]
fn engine_matches_reference_model() {
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        ..Config::default()
    });
    let coverage = RefCell::new(Coverage::new());
    let result = runner.run(&case(), |case| Run::new(&case, &coverage)?.run(&case));
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => panic!("{why}\nminimal failing case: {case:#?}"),
        Err(e) => panic!("{e}"),
    }
    let coverage = coverage.into_inner();
    if n >= 10_000 {
        let missing: Vec<&&str> = MUST_COVER
            .iter()
            .filter(|k| !coverage.contains_key(**k))
            .collect();
        assert!(
            missing.is_empty(),
            "never reached {missing:?}; got {coverage:#?}"
        );
    }
}

/// Where the engines of a run keep their state.
pub(crate) enum Backend {
    /// One engine, its own table.
    Local,
    /// Several engines sharing one Redis (README "Several instances").
    #[cfg(feature = "redis")]
    Shared { url: String, engines: usize },
}

#[cfg(feature = "redis")]
fn shared_cases() -> u32 {
    std::env::var("PROPTEST_SHARED_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

/// Two or three engines on one Redis, each operation on one of them at
/// random, agree with the same reference model as one engine (README
/// "Several instances": the answers are one engine's), sweeps aside (the
/// store expires keys itself).
#[cfg(feature = "redis")]
#[test]
fn engines_sharing_redis_match_reference_model() {
    let server = redis_support::RedisServer::start();
    let mut runner = TestRunner::new(Config {
        cases: shared_cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        ..Config::default()
    });
    let coverage = RefCell::new(Coverage::new());
    let result = runner.run(&case(), |case| {
        // Each case on an empty store: subjects recur across cases.
        server.cmd(&["FLUSHALL"]);
        let backend = Backend::Shared {
            url: server.url(),
            engines: 2 + case.ops.len() % 2,
        };
        Run::on(&case, &coverage, &backend)?.run(&case)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => panic!("{why}\nminimal failing case: {case:#?}"),
        Err(e) => panic!("{e}"),
    }
}

/// The model's own PKCE helpers agree with RFC 7636 Appendix B, so a
/// disagreement with the engine is never the model's S256 being wrong.
#[test]
fn model_pkce_helpers_match_rfc7636_appendix_b() {
    assert_eq!(s256_of(RFC7636_VERIFIER), RFC7636_CHALLENGE);
    assert!(is_verifier(RFC7636_VERIFIER));
    assert!(is_s256_challenge(RFC7636_CHALLENGE));
    let challenge = authorize_pkce(Pkce::S256, Some(RFC7636_CHALLENGE), Some("S256"));
    assert_eq!(
        challenge,
        Ok(Some(MChallenge::S256(RFC7636_CHALLENGE.to_owned())))
    );
    let c = challenge.expect("valid").expect("a challenge");
    assert_eq!(
        exchange_pkce(Some(&c), Some(RFC7636_VERIFIER), Pkce::S256),
        Ok(())
    );
}

/// `grace_same_ip`: a retry from the IPv4-mapped spelling (`::ffff:a.b.c.d`)
/// of the address the rotation came from is from the same IP, as the
/// allow-list already treats it: it gets the identical successor, and the
/// family is not revoked as a reuse.
#[test]
fn grace_same_ip_treats_ipv4_mapped_as_the_same_ip() {
    let clock = Arc::new(ManualClock::new(ts(START_MS)));
    let set = PolicySet::builder()
        .defaults(
            PolicyOverrides::new()
                .grace_period(Duration::from_secs(10))
                .grace_same_ip(true),
        )
        .build()
        .expect("valid set");
    let engine = Engine::builder()
        .policies(set)
        .clock(clock.clone())
        .build()
        .expect("engine");
    let v4: IpAddr = "10.0.0.1".parse().expect("ip");
    let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
    let issue = IssueRequest {
        client: CLIENTS[0],
        subject: SUBJECTS[0],
        scope: SCOPE,
        ip: Some(v4),
    };
    let t1 = engine
        .issue(&issue)
        .expect("issue")
        .accepted()
        .expect("issued")
        .token;
    let rotated = engine
        .redeem(&RedeemRequest::new(&t1, CLIENTS[0]).ip(v4))
        .expect("redeem");
    let t2 = rotated.accepted().expect("rotated").token;
    clock.advance(Duration::from_secs(1));
    let retry = engine
        .redeem(&RedeemRequest::new(&t1, CLIENTS[0]).ip(mapped))
        .expect("redeem");
    assert_eq!(
        retry
            .accepted()
            .map(|a| (a.kind, a.token.as_str().to_owned())),
        Some((AcceptKind::GraceReplay, t2.as_str().to_owned())),
        "retry from the mapped spelling of the rotation's IP: {retry:?}"
    );
    assert_eq!(
        engine.introspect(&t2).map(|i| i.status),
        Some(Status::Active)
    );
}
