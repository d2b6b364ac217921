//! Sender-constrained families (README "The order of checks", step 6, and
//! the `dpop` knob): what binds a family to a DPoP key, what a bound family
//! accepts, that refusals revoke nothing, and that the binding survives the
//! store (restart, compaction, backup and restore, the older format).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use refresh_guard::{
    AcceptKind, AuthorizeRequest, Clock, Decision, DenyReason, Dpop, Engine, EventKind,
    ExchangeRequest, IssueRequest, Jkt, KeyId, KeyRing, KeySecret, LogOptions, LogStore,
    ManualClock, MemorySink, PolicyOverrides, PolicySet, RedeemRequest, Rotation, Timestamp, Token,
};

const PUBLIC: &str = "spa";
const CONFIDENTIAL: &str = "backend";
const REDIRECT: &str = "https://app.example/cb";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const START: Timestamp = Timestamp::from_secs(1_700_000_000);
const A: Jkt = Jkt::from_bytes([0xa1; 32]);
const B: Jkt = Jkt::from_bytes([0xb2; 32]);

fn ip() -> IpAddr {
    "10.0.0.1".parse().unwrap()
}

fn keys() -> KeyRing {
    KeyRing::new(KeyId(1), &KeySecret::from_bytes([7; 32]))
}

/// A set with one public and one confidential client, both with `dpop`
/// and a 10 s grace window for two replays.
fn set(dpop: Dpop) -> PolicySet {
    let o = || {
        PolicyOverrides::new()
            .dpop(dpop)
            .grace_period(Duration::from_secs(10))
            .grace_max_replays(2)
    };
    PolicySet::builder()
        .client(PUBLIC, o())
        .client(CONFIDENTIAL, o().client_secret_sha256(Some([9; 32])))
        .build()
        .unwrap()
}

struct Harness {
    engine: Engine,
    clock: Arc<ManualClock>,
    sink: Arc<MemorySink>,
}

fn harness(dpop: Dpop) -> Harness {
    let clock = Arc::new(ManualClock::new(START));
    let sink = Arc::new(MemorySink::new());
    let engine = Engine::builder()
        .policies(set(dpop))
        .keys(keys())
        .clock(clock.clone())
        .events(sink.clone())
        .build()
        .unwrap();
    Harness {
        engine,
        clock,
        sink,
    }
}

impl Harness {
    fn code(&self, client: &str, dpop_jkt: Option<Jkt>) -> Token {
        self.engine
            .authorize(&AuthorizeRequest {
                client,
                subject: "alice",
                scope: "openid offline_access",
                redirect_uri: REDIRECT,
                code_challenge: Some(CHALLENGE),
                code_challenge_method: Some("S256"),
                ip: Some(ip()),
                dpop_jkt,
            })
            .unwrap()
            .accepted()
            .cloned()
            .expect("code issued")
            .token
    }

    fn exchange(&self, code: &Token, client: &str, dpop: Option<Jkt>) -> Decision {
        self.engine
            .exchange(&ExchangeRequest {
                code,
                code_verifier: Some(VERIFIER),
                client,
                redirect_uri: REDIRECT,
                ip: Some(ip()),
                dpop,
            })
            .unwrap()
    }

    /// A family born from a code exchanged with `dpop`; its first token.
    fn family(&self, client: &str, dpop: Option<Jkt>) -> Token {
        let code = self.code(client, None);
        self.exchange(&code, client, dpop)
            .accepted()
            .cloned()
            .expect("exchanged")
            .token
    }

    fn present(&self, token: &Token, client: &str, dpop: Option<Jkt>) -> Decision {
        self.engine
            .redeem(&RedeemRequest::new(token, client).ip(ip()).dpop(dpop))
            .unwrap()
    }

    fn rotate(&self, token: &Token, client: &str, dpop: Option<Jkt>) -> Token {
        let a = self
            .present(token, client, dpop)
            .accepted()
            .cloned()
            .expect("rotated");
        assert_eq!(a.kind, AcceptKind::Rotated);
        a.token
    }

    fn event_names(&self) -> Vec<&'static str> {
        self.sink.take().iter().map(|e| e.kind.as_str()).collect()
    }
}

/// A scratch directory only its owner can reach, as the store demands.
fn private_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn reason(d: &Decision) -> Option<DenyReason> {
    d.deny_reason()
}

/// A public client's family exchanged with a proof under `allowed` is bound
/// to that key: without a proof, or with another key, it is refused with
/// its own reason and event, and nothing is revoked (the owner's next
/// redemption with the key works).
#[test]
fn a_bound_family_accepts_only_its_key_and_refusals_revoke_nothing() {
    let h = harness(Dpop::Allowed);
    let t1 = h.family(PUBLIC, Some(A));
    h.sink.take();
    let d = h.present(&t1, PUBLIC, None);
    assert_eq!(reason(&d), Some(DenyReason::DpopProofRequired));
    assert_eq!(h.event_names(), ["dpop_proof_required"]);
    let d = h.present(&t1, PUBLIC, Some(B));
    assert_eq!(reason(&d), Some(DenyReason::DpopKeyMismatch));
    let events = h.sink.take();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::DpopKeyMismatch);
    assert_eq!(events[0].client.as_deref(), Some(PUBLIC));
    assert_eq!(events[0].ip, Some(ip()));
    // The plain entry point carries no proof.
    let d = h
        .engine
        .redeem(&RedeemRequest::new(&t1, PUBLIC).ip(ip()))
        .unwrap();
    assert_eq!(reason(&d), Some(DenyReason::DpopProofRequired));
    let t2 = h.rotate(&t1, PUBLIC, Some(A));
    let t3 = h.rotate(&t2, PUBLIC, Some(A));
    assert_eq!(
        reason(&h.present(&t3, PUBLIC, Some(B))),
        Some(DenyReason::DpopKeyMismatch),
        "fixed across rotations"
    );
    for r in [DenyReason::DpopProofRequired, DenyReason::DpopKeyMismatch] {
        assert_eq!(r.oauth_error().as_str(), "invalid_grant");
    }
    let stats = h.engine.stats();
    assert_eq!(stats.outcome("dpop_proof_required"), 2);
    assert_eq!(stats.outcome("dpop_key_mismatch"), 2);
    assert_eq!(
        stats
            .events
            .revoked(refresh_guard::RevokeReason::ReuseDetected),
        0
    );
}

/// A grace replay is a redemption: it needs the key too. A thief holding
/// the just-rotated token but not the key gets no successor, and (outside
/// the window) cannot set off the reuse revocation either.
#[test]
fn grace_replays_and_reuse_need_the_key_before_anything_happens() {
    let h = harness(Dpop::Allowed);
    let t1 = h.family(PUBLIC, Some(A));
    let t2 = h.rotate(&t1, PUBLIC, Some(A));
    assert_eq!(
        reason(&h.present(&t1, PUBLIC, Some(B))),
        Some(DenyReason::DpopKeyMismatch)
    );
    assert_eq!(
        reason(&h.present(&t1, PUBLIC, None)),
        Some(DenyReason::DpopProofRequired)
    );
    let replay = h
        .present(&t1, PUBLIC, Some(A))
        .accepted()
        .cloned()
        .expect("grace");
    assert_eq!(replay.kind, AcceptKind::GraceReplay);
    assert_eq!(replay.token, t2, "the same successor");
    // Outside the window, the spent token with another key: refused, the
    // family lives on.
    h.clock.advance(Duration::from_secs(11));
    h.sink.take();
    assert_eq!(
        reason(&h.present(&t1, PUBLIC, Some(B))),
        Some(DenyReason::DpopKeyMismatch)
    );
    assert_eq!(h.event_names(), ["dpop_key_mismatch"]);
    let t3 = h.rotate(&t2, PUBLIC, Some(A));
    // With the key, a spent token is reuse as ever.
    assert_eq!(
        reason(&h.present(&t1, PUBLIC, Some(A))),
        Some(DenyReason::ReuseDetected)
    );
    assert_eq!(
        reason(&h.present(&t3, PUBLIC, Some(A))),
        Some(DenyReason::Revoked)
    );
}

/// Step 6 comes after client binding, revocation and expiry: those answers
/// do not depend on the proof.
#[test]
fn the_dpop_check_comes_after_client_revocation_and_expiry() {
    let h = harness(Dpop::Allowed);
    let t1 = h.family(PUBLIC, Some(A));
    assert_eq!(
        reason(&h.present(&t1, CONFIDENTIAL, None)),
        Some(DenyReason::ClientMismatch)
    );
    let idle = h.family(PUBLIC, Some(A));
    assert!(h.engine.revoke_token(&t1, None).unwrap());
    assert_eq!(
        reason(&h.present(&t1, PUBLIC, None)),
        Some(DenyReason::Revoked)
    );
    h.clock.advance(Duration::from_secs(31 * 86_400));
    assert_eq!(
        reason(&h.present(&idle, PUBLIC, Some(B))),
        Some(DenyReason::ExpiredIdle)
    );
}

/// `allowed` binds only a public client's family, and only when the
/// exchange brings a proof; `off` binds nothing.
#[test]
fn allowed_binds_public_clients_with_a_proof_and_off_binds_nothing() {
    let h = harness(Dpop::Allowed);
    let confidential = h.family(CONFIDENTIAL, Some(A));
    let c2 = h.rotate(&confidential, CONFIDENTIAL, None);
    h.rotate(&c2, CONFIDENTIAL, Some(B));
    let no_proof = h.family(PUBLIC, None);
    let n2 = h.rotate(&no_proof, PUBLIC, None);
    // `allowed` does not bind at a refresh.
    let n3 = h.rotate(&n2, PUBLIC, Some(A));
    h.rotate(&n3, PUBLIC, None);
    let off = harness(Dpop::Off);
    let t1 = off.family(PUBLIC, Some(A));
    off.rotate(&t1, PUBLIC, None);
}

/// `required`: no exchange and no refresh without a proof. A public
/// client's family is bound at the exchange; a confidential client's never.
#[test]
fn required_refuses_exchange_and_refresh_without_a_proof() {
    let h = harness(Dpop::Required);
    let code = h.code(PUBLIC, None);
    assert_eq!(
        reason(&h.exchange(&code, PUBLIC, None)),
        Some(DenyReason::DpopProofRequired)
    );
    let t1 = h
        .exchange(&code, PUBLIC, Some(A))
        .accepted()
        .cloned()
        .expect("exchanged with a proof")
        .token;
    assert_eq!(
        reason(&h.present(&t1, PUBLIC, Some(B))),
        Some(DenyReason::DpopKeyMismatch)
    );
    let c1 = h.family(CONFIDENTIAL, Some(A));
    assert_eq!(
        reason(&h.present(&c1, CONFIDENTIAL, None)),
        Some(DenyReason::DpopProofRequired)
    );
    // Any key will do: the client authenticates, its family is not bound.
    let c2 = h.rotate(&c1, CONFIDENTIAL, Some(B));
    h.rotate(&c2, CONFIDENTIAL, Some(A));
}

/// Switching a client to `required` with unbound families alive: a
/// redemption without a proof is refused (nothing revoked), the first one
/// with a proof binds the family to its key from then on, and the binding
/// is persisted.
#[test]
fn required_binds_a_live_unbound_family_to_its_next_proof_durably() {
    let dir = private_dir();
    let clock = Arc::new(ManualClock::new(START));
    let open = |dpop| {
        Engine::builder()
            .policies(set(dpop))
            .keys(keys())
            .clock(clock.clone())
            .store(LogStore::open(dir.path(), LogOptions::default()).unwrap())
            .build()
            .unwrap()
    };
    let e = open(Dpop::Off);
    let t1 = e
        .issue(&IssueRequest {
            client: PUBLIC,
            subject: "alice",
            scope: "openid",
            ip: Some(ip()),
        })
        .unwrap()
        .accepted()
        .cloned()
        .unwrap()
        .token;
    e.swap_policies(set(Dpop::Required));
    let redeem = |e: &Engine, t: &Token, k: Option<Jkt>| {
        e.redeem(&RedeemRequest::new(t, PUBLIC).ip(ip()).dpop(k))
            .unwrap()
    };
    assert_eq!(
        redeem(&e, &t1, None).deny_reason(),
        Some(DenyReason::DpopProofRequired)
    );
    let t2 = redeem(&e, &t1, Some(A))
        .accepted()
        .cloned()
        .expect("bound now")
        .token;
    assert_eq!(
        redeem(&e, &t2, Some(B)).deny_reason(),
        Some(DenyReason::DpopKeyMismatch)
    );
    e.flush().unwrap();
    drop(e);
    // Back to `off` after a restart: bound for life all the same.
    let e = open(Dpop::Off);
    assert_eq!(
        redeem(&e, &t2, None).deny_reason(),
        Some(DenyReason::DpopProofRequired)
    );
    assert_eq!(
        redeem(&e, &t2, Some(A)).accepted().cloned().map(|a| a.kind),
        Some(AcceptKind::Rotated)
    );
}

/// RFC 9449 §10: a code requested with `dpop_jkt` is exchanged only with a
/// proof from that key, and a public client's family inherits the binding.
#[test]
fn a_code_bound_by_dpop_jkt_needs_its_key_and_hands_it_to_the_family() {
    let h = harness(Dpop::Allowed);
    let code = h.code(PUBLIC, Some(A));
    h.sink.take();
    assert_eq!(
        reason(&h.exchange(&code, PUBLIC, None)),
        Some(DenyReason::DpopProofRequired)
    );
    assert_eq!(
        reason(&h.exchange(&code, PUBLIC, Some(B))),
        Some(DenyReason::DpopKeyMismatch)
    );
    assert_eq!(
        h.event_names(),
        ["dpop_proof_required", "dpop_key_mismatch"]
    );
    let t1 = h
        .exchange(&code, PUBLIC, Some(A))
        .accepted()
        .cloned()
        .expect("exchanged")
        .token;
    assert_eq!(
        reason(&h.present(&t1, PUBLIC, None)),
        Some(DenyReason::DpopProofRequired)
    );
    h.rotate(&t1, PUBLIC, Some(A));
    // A confidential client's code is bound, its refresh tokens are not.
    let code = h.code(CONFIDENTIAL, Some(A));
    assert_eq!(
        reason(&h.exchange(&code, CONFIDENTIAL, Some(B))),
        Some(DenyReason::DpopKeyMismatch)
    );
    let c1 = h
        .exchange(&code, CONFIDENTIAL, Some(A))
        .accepted()
        .cloned()
        .unwrap()
        .token;
    h.rotate(&c1, CONFIDENTIAL, None);
}

/// A replay of the code of a bound family without its key is refused
/// before it is judged: it cannot revoke the family. With the key, it is
/// `code_reused` as ever.
#[test]
fn a_code_replay_without_the_key_revokes_nothing() {
    let h = harness(Dpop::Allowed);
    let code = h.code(PUBLIC, None);
    let t1 = h
        .exchange(&code, PUBLIC, Some(A))
        .accepted()
        .cloned()
        .unwrap()
        .token;
    assert_eq!(
        reason(&h.exchange(&code, PUBLIC, None)),
        Some(DenyReason::DpopProofRequired)
    );
    assert_eq!(
        reason(&h.exchange(&code, PUBLIC, Some(B))),
        Some(DenyReason::DpopKeyMismatch)
    );
    let t2 = h.rotate(&t1, PUBLIC, Some(A));
    assert_eq!(
        reason(&h.exchange(&code, PUBLIC, Some(A))),
        Some(DenyReason::CodeReused)
    );
    assert_eq!(
        reason(&h.present(&t2, PUBLIC, Some(A))),
        Some(DenyReason::Revoked)
    );
}

/// Backup and restore (`family_record` / `restore_family`) and compaction
/// carry the binding.
#[test]
fn backups_restores_and_snapshots_keep_the_binding() {
    let h = harness(Dpop::Allowed);
    let t1 = h.family(PUBLIC, Some(A));
    let family = h.present(&t1, PUBLIC, Some(A)).accepted().cloned().unwrap();
    let backup = h.engine.family_record(family.family).unwrap();
    assert_eq!(backup.jkt(), Some(A));
    assert_eq!(h.engine.introspect(&family.token).unwrap().jkt, Some(A));
    let other = harness(Dpop::Off);
    other.engine.restore_family(backup).unwrap();
    assert_eq!(
        reason(&other.present(&family.token, PUBLIC, None)),
        Some(DenyReason::DpopProofRequired)
    );
    other.rotate(&family.token, PUBLIC, Some(A));

    let dir = private_dir();
    let open = || {
        Engine::builder()
            .policies(set(Dpop::Allowed))
            .keys(keys())
            .clock(h.clock.clone())
            .store(LogStore::open(dir.path(), LogOptions::default()).unwrap())
            .build()
            .unwrap()
    };
    let e = open();
    let code = e
        .authorize(&AuthorizeRequest {
            client: PUBLIC,
            subject: "bob",
            scope: "openid",
            redirect_uri: REDIRECT,
            code_challenge: Some(CHALLENGE),
            code_challenge_method: Some("S256"),
            ip: Some(ip()),
            dpop_jkt: Some(B),
        })
        .unwrap()
        .accepted()
        .cloned()
        .unwrap()
        .token;
    e.compact().unwrap();
    drop(e);
    let e = open();
    let exchange = |k| {
        e.exchange(&ExchangeRequest {
            code: &code,
            code_verifier: Some(VERIFIER),
            client: PUBLIC,
            redirect_uri: REDIRECT,
            ip: Some(ip()),
            dpop: k,
        })
        .unwrap()
    };
    assert_eq!(
        exchange(Some(A)).deny_reason(),
        Some(DenyReason::DpopKeyMismatch),
        "the code's dpop_jkt survived the snapshot"
    );
    assert!(exchange(Some(B)).accepted().cloned().is_some());
}

/// Copy the committed data directory written before DPoP binding existed
/// (tests/fixtures/store-format1, with its tokens) into a private
/// directory, as the store demands.
fn old_store() -> (tempfile::TempDir, Vec<(String, String)>) {
    use std::os::unix::fs::PermissionsExt;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-format1");
    let dir = private_dir();
    let mut tokens = Vec::new();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path: PathBuf = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name == "tokens.txt" {
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let (k, v) = line.split_once(' ').unwrap();
                tokens.push((k.to_owned(), v.to_owned()));
            }
            continue;
        }
        let to = dir.path().join(&name);
        std::fs::copy(&path, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    (dir, tokens)
}

/// The log format gained the thumbprint compatibly: a data directory
/// written before still starts, every family in it is unbound, and under
/// `required` its families bind at their next proof.
#[test]
fn a_data_directory_from_before_dpop_still_starts_unbound() {
    let (dir, tokens) = old_store();
    let token = |name: &str| tokens.iter().find(|(k, _)| k == name).unwrap().1.clone();
    let clock = Arc::new(ManualClock::new(START));
    let open = |set: PolicySet| {
        Engine::builder()
            .policies(set)
            .keys(keys())
            .clock(clock.clone())
            .store(LogStore::open(dir.path(), LogOptions::default()).unwrap())
            .build()
            .unwrap()
    };
    let e = open(PolicySet::default());
    let current = token("refresh_current");
    let next = e
        .redeem(&RedeemRequest::new(&current, "app").ip(ip()))
        .unwrap();
    assert_eq!(
        next.accepted().cloned().map(|a| a.kind),
        Some(AcceptKind::Rotated)
    );
    let code = token("code_unexchanged");
    let t1 = e
        .exchange(&ExchangeRequest {
            code: &code,
            code_verifier: Some(VERIFIER),
            client: "spa",
            redirect_uri: REDIRECT,
            ip: Some(ip()),
            dpop: None,
        })
        .unwrap()
        .accepted()
        .cloned()
        .expect("the old code is exchanged")
        .token;
    e.redeem(&RedeemRequest::new(&t1, "spa").ip(ip()))
        .unwrap()
        .accepted()
        .cloned()
        .unwrap();
    e.flush().unwrap();
    drop(e);
    let required = PolicySet::builder()
        .client("spa", PolicyOverrides::new().dpop(Dpop::Required))
        .build()
        .unwrap();
    let e = open(required);
    let from_code = token("refresh_from_code");
    let redeem = |k| {
        e.redeem(&RedeemRequest::new(&from_code, "spa").ip(ip()).dpop(k))
            .unwrap()
    };
    assert_eq!(
        redeem(None).deny_reason(),
        Some(DenyReason::DpopProofRequired)
    );
    let bound = redeem(Some(A)).accepted().cloned().expect("binds").token;
    assert_eq!(
        e.redeem(&RedeemRequest::new(&bound, "spa").ip(ip()).dpop(B))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::DpopKeyMismatch)
    );
}

/// The thumbprint's wire form parses and prints, and bad input says where
/// it is bad.
#[test]
fn thumbprints_parse_from_their_wire_form() {
    let j: Jkt = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        .parse()
        .unwrap();
    assert_eq!(
        j.to_base64url(),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
    let e = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9X!"
        .parse::<Jkt>()
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "DPoP key thumbprint (jkt): invalid base64url character at offset 42"
    );
    assert_eq!(format!("{j:?}"), "Jkt(..)");
}

// ---- the property ----

#[derive(Clone, Copy, Debug)]
enum Key {
    Bound,
    Other,
    None,
}

#[derive(Clone, Debug)]
enum Op {
    /// Redeem the current token, or its predecessor.
    Redeem {
        previous: bool,
        key: Key,
    },
    Advance(u64),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let key = prop_oneof![Just(Key::Bound), Just(Key::Other), Just(Key::None)];
    prop_oneof![
        6 => (any::<bool>(), key).prop_map(|(previous, key)| Op::Redeem { previous, key }),
        2 => (0u64..8).prop_map(Op::Advance),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A bound family accepts only its key, across rotations, grace
    /// replays and restarts (the store reopened): any other key or no
    /// proof is refused with its DPoP reason and changes nothing, while
    /// with the key it behaves exactly as an unbound family would.
    #[test]
    fn a_bound_family_accepts_only_its_key(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = private_dir();
        let clock = Arc::new(ManualClock::new(START));
        let open = || {
            Engine::builder()
                .policies(set(Dpop::Allowed))
                .keys(keys())
                .clock(clock.clone())
                .store(LogStore::open(dir.path(), LogOptions::default()).unwrap())
                .build()
                .unwrap()
        };
        let mut e = open();
        let code = e
            .authorize(&AuthorizeRequest {
                client: PUBLIC, subject: "alice", scope: "openid", redirect_uri: REDIRECT,
                code_challenge: Some(CHALLENGE), code_challenge_method: Some("S256"),
                ip: Some(ip()), dpop_jkt: None,
            })
            .unwrap().accepted().cloned().unwrap().token;
        let mut current = e
            .exchange(&ExchangeRequest {
                code: &code, code_verifier: Some(VERIFIER), client: PUBLIC,
                redirect_uri: REDIRECT, ip: Some(ip()), dpop: Some(A),
            })
            .unwrap().accepted().cloned().unwrap().token;
        // The model: the predecessor, when the rotation was, replays used,
        // revoked.
        let mut previous: Option<Token> = None;
        let mut rotated_at = START;
        let mut replays = 0u8;
        let mut revoked = false;
        for op in ops {
            match op {
                Op::Advance(s) => clock.advance(Duration::from_secs(s)),
                Op::Restart => {
                    e.flush().unwrap();
                    drop(e);
                    e = open();
                }
                Op::Redeem { previous: use_previous, key } => {
                    let token = match (use_previous, &previous) {
                        (true, Some(p)) => *p,
                        _ => current,
                    };
                    let is_previous = use_previous && previous.is_some();
                    let jkt = match key { Key::Bound => Some(A), Key::Other => Some(B), Key::None => None };
                    let d = e
                        .redeem(&RedeemRequest::new(&token, PUBLIC).ip(ip()).dpop(jkt))
                        .unwrap();
                    let now = clock.now();
                    let want = if revoked {
                        Err(DenyReason::Revoked)
                    } else {
                        match key {
                            Key::None => Err(DenyReason::DpopProofRequired),
                            Key::Other => Err(DenyReason::DpopKeyMismatch),
                            Key::Bound if !is_previous => Ok(AcceptKind::Rotated),
                            Key::Bound if now < rotated_at.saturating_add(Duration::from_secs(10)) && replays < 2 => {
                                Ok(AcceptKind::GraceReplay)
                            }
                            Key::Bound => Err(DenyReason::ReuseDetected),
                        }
                    };
                    match (&d, want) {
                        (Decision::Accept(a), Ok(kind)) => {
                            prop_assert_eq!(a.kind, kind);
                            if kind == AcceptKind::Rotated {
                                previous = Some(std::mem::replace(&mut current, a.token));
                                rotated_at = now;
                                replays = 0;
                            } else {
                                prop_assert_eq!(&a.token, &current, "the same successor");
                                replays += 1;
                            }
                        }
                        (Decision::Deny(got), Err(want)) => {
                            prop_assert_eq!(got.reason, want);
                            if want == DenyReason::ReuseDetected {
                                revoked = true;
                            }
                        }
                        (got, want) => prop_assert!(false, "got {:?}, want {:?}", got, want),
                    }
                }
            }
        }
    }
}

/// `rotation = reuse` with a bound family: the kept token too needs the key.
#[test]
fn a_kept_token_of_a_bound_family_needs_the_key() {
    let set = PolicySet::builder()
        .client(
            PUBLIC,
            PolicyOverrides::new()
                .rotation(Rotation::Reuse)
                .dpop(Dpop::Required),
        )
        .build()
        .unwrap();
    let h = harness(Dpop::Off);
    h.engine.swap_policies(set);
    let t1 = h.family(PUBLIC, Some(A));
    let kept = h.present(&t1, PUBLIC, Some(A)).accepted().cloned().unwrap();
    assert_eq!(kept.kind, AcceptKind::Kept);
    assert_eq!(
        reason(&h.present(&t1, PUBLIC, Some(B))),
        Some(DenyReason::DpopKeyMismatch)
    );
}
