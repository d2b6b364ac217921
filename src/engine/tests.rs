use super::stats::{ACCEPT_KINDS, slot_name};
use super::*;
use crate::RedeemRequest;
use crate::event::{EventKind, MemorySink};
use crate::family::RevokeReason;
use crate::family::SubjectName;
use crate::store::{Durability, RecordRef};
use std::sync::atomic::Ordering;

/// An engine builder whose policies cap each subject at `cap` families.
fn capped(cap: u32) -> EngineBuilder {
    use crate::policy::{PolicyOverrides, PolicySet};
    Engine::builder().policies(
        PolicySet::builder()
            .defaults(PolicyOverrides::new().max_families_per_subject(cap))
            .build()
            .unwrap(),
    )
}

/// Issue a family of client `app` to `subject`; its token and id.
fn issue_to(e: &Engine, subject: &str) -> (Token, FamilyId) {
    issue_scoped(e, subject, "openid")
}

/// [`issue_to`] with `scope`.
fn issue_scoped(e: &Engine, subject: &str, scope: &str) -> (Token, FamilyId) {
    let d = e
        .issue(&IssueRequest {
            client: "app",
            subject,
            scope,
            ip: Some("10.0.0.1".parse().unwrap()),
        })
        .unwrap();
    let a = d.accepted().unwrap();
    (a.token, a.family)
}

/// Issue runs the huge-page collapse its insert asked for (after its
/// locks are released).
#[test]
fn issue_runs_the_collapse_it_noted() {
    use crate::huge::{HUGE, tests::RUN};
    let e = Engine::builder().shards(1).build().unwrap();
    let before = RUN.with(|n| n.get());
    let n = 3 * HUGE / size_of::<Family>();
    for i in 0..n {
        issue_to(&e, &format!("user-{i}"));
    }
    assert!(RUN.with(|n| n.get()) > before, "a collapse ran");
}

/// Scopes come from authorization requests: once their families are
/// swept, a full pass forgets the pairs, so the interner does not grow
/// with every scope ever granted.
#[test]
fn a_sweep_pass_forgets_the_grants_of_swept_families() {
    let e = Engine::builder()
        .shards(4)
        .revoked_retention(Duration::ZERO)
        .build()
        .unwrap();
    let issue = |scope: &str| issue_scoped(&e, "alice", scope).1;
    let kept = issue("openid");
    for i in 0..100 {
        let id = issue(&format!("read:doc:{i}"));
        assert!(e.revoke_family(id).unwrap());
    }
    // "app", "openid", and 100 pairs with a scope each.
    assert_eq!(e.interner.len(), (101, 102));
    // One pass over 4 shards of about 100 slots, and then some.
    let report = e.sweep(1_000).unwrap();
    assert_eq!(report.removed, 100);
    assert_eq!(e.interner.len(), (1, 2), "only the live family's pair");
    assert!(e.family_record(kept).is_some());
}

#[test]
fn outcome_slots_name_their_outcome() {
    for k in ACCEPT_KINDS {
        assert_eq!(slot_name(outcome_slot(Verdict::Accept(k))), k.as_str());
    }
    for r in DenyReason::ALL {
        assert_eq!(slot_name(outcome_slot(Verdict::Deny(r))), r.as_str());
    }
    assert!(ACCEPT_KINDS.len() + DenyReason::ALL.len() <= OUTCOMES);
}

/// Subjects whose index entries collide (same shard, same hash) stay
/// apart: the cap and subject-wide revocation of one leave the other's
/// families alone.
#[test]
fn colliding_subjects_stay_apart() {
    let mut e = capped(1).build().unwrap();
    e.subjects = SubjectIndex::colliding(4);
    let issue = |subject: &str| issue_to(&e, subject).1;
    let bob = issue("bob");
    let alice1 = issue("alice");
    let alice2 = issue("alice");
    let active = |id| e.family_record(id).unwrap().status() == Status::Active;
    assert!(!active(alice1), "alice's cap of 1 evicted her older family");
    assert!(active(bob), "bob's family is not alice's to evict");
    assert!(active(alice2));
    assert_eq!(e.revoke_subject("alice", None).unwrap(), 1);
    assert!(active(bob));
    assert!(!active(alice2));
    let indexed: Vec<FamilyId> = e
        .subjects
        .lock("bob")
        .candidates()
        .into_iter()
        .map(|loc| {
            let (shard, slot) = e.table.lock_loc(loc);
            shard.at(slot).expect("an indexed family").id
        })
        .collect();
    assert_eq!(indexed, [bob]);
    assert_eq!(e.revoke_subject("bob", None).unwrap(), 1);
    assert!(e.subjects.lock("bob").candidates().is_empty());
}

/// The sweeper removes an expired family's index entry after dropping
/// the shard lock. Walks that meet the entry in between (the cap of a
/// new issue, a subject revocation) must leave it: the slot can be
/// reused by a new family of the same subject at once, and the
/// sweeper's removal then takes one of two equal entries. Had a walk
/// removed the first, the new family would lose its own.
#[test]
fn a_pending_removal_never_takes_a_new_familys_entry() {
    let e = capped(5).shards(1).build().unwrap();
    let issue = |subject: &str| issue_to(&e, subject).1;
    let old = issue("alice");
    // The sweeper's first half: the family leaves the table.
    let removed = e.table.sweep(64, |f| f.id == old).removed;
    let [(loc, _)] = removed[..] else {
        panic!("one family swept");
    };
    // Walks meet the entry while its removal is pending.
    assert_eq!(e.revoke_subject("alice", None).unwrap(), 0);
    let new = issue("alice");
    let reused = {
        let shard = e.table.lock(&new);
        e.table.loc(&new, shard.find(&new).unwrap())
    };
    assert_eq!(reused, loc, "the new family took the freed slot");
    // The sweeper's second half.
    e.subjects.remove("alice", loc);
    assert_eq!(e.subjects.len(), 1);
    assert_eq!(
        e.revoke_subject("alice", None).unwrap(),
        1,
        "the new family is still indexed"
    );
    assert_eq!(e.subjects.len(), 0);
}

/// The cap evicts only the family it listed: a restore that gives the
/// listed record another subject between the walk and the eviction
/// (the restore holds the other subject's index lock, not this one's)
/// must not get the other subject's family evicted. Raced with real
/// threads; the evictions are read back from the events.
#[test]
fn the_cap_never_evicts_a_family_restored_under_another_subject() {
    use crate::event::{EventKind, MemorySink};
    let sink = Arc::new(MemorySink::new());
    let e = capped(1)
        .events(sink.clone())
        .revoked_retention(Duration::ZERO)
        .build()
        .unwrap();
    let issue = |subject: &str| issue_to(&e, subject).1;
    // A name whose index shard is not alice's, so the restore (under
    // its lock) can run while alice's cap walks (under hers).
    let bob = (0..)
        .map(|i| format!("bob{i}"))
        .find(|b| e.subjects.shard_of(b) != e.subjects.shard_of("alice"))
        .unwrap();
    let x = issue(&bob);
    let record = e.family_record(x).unwrap();
    let as_subject = |s: &str| {
        let mut r = record.0.clone();
        r.subject = SubjectName::new(s);
        FamilyRecord(r)
    };
    let (as_alice, as_bob) = (as_subject("alice"), as_subject(&bob));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..20_000 {
                e.restore_family(FamilyRecord(as_alice.0.clone())).unwrap();
                e.restore_family(FamilyRecord(as_bob.0.clone())).unwrap();
            }
        });
        for _ in 0..20_000 {
            issue("alice");
            e.sweep(1024).unwrap();
        }
    });
    for ev in sink.take() {
        if let EventKind::CapEviction { .. } = ev.kind {
            assert_eq!(ev.subject.as_deref(), Some("alice"), "{ev:?}");
        }
    }
}

/// A store whose writes fail once armed.
struct FailingStore {
    armed: Arc<std::sync::atomic::AtomicBool>,
    lsn: AtomicU64,
}

impl Store for FailingStore {
    fn recover(&self) -> Result<Vec<crate::store::StoredRecord>, Error> {
        Ok(Vec::new())
    }
    fn put(&self, _: RecordRef<'_>) -> Result<u64, Error> {
        if self.armed.load(Ordering::SeqCst) {
            return Err(Error::store("test: disk full"));
        }
        Ok(self.lsn.fetch_add(1, Ordering::SeqCst) + 1)
    }
    fn remove(&self, _: FamilyId, _: u64) -> Result<u64, Error> {
        Ok(self.lsn.fetch_add(1, Ordering::SeqCst) + 1)
    }
    fn wait_durable(&self, _: u64) -> Result<(), Error> {
        Ok(())
    }
    fn poll_durable(&self, _: u64, _: &std::task::Waker) -> std::task::Poll<Result<(), Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn durability(&self) -> Durability {
        Durability::Sync
    }
    fn compact(&self, _: &mut crate::store::Snapshot<'_>) -> Result<(), Error> {
        Ok(())
    }
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// A family revoked by a call whose store write then fails is still
/// revoked in memory (fail closed), so it leaves the subject index all
/// the same: by family, by reuse, and by client (which stops at the
/// first failure but unindexes what it revoked).
#[test]
fn revocations_unindex_even_when_the_store_fails() {
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let e = Engine::builder()
        .store(FailingStore {
            armed: armed.clone(),
            lsn: AtomicU64::new(0),
        })
        .build()
        .unwrap();
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let issue = |subject: &str| issue_to(&e, subject);
    let a = issue("a");
    let b = issue("b");
    let c = issue("c");
    e.redeem(&RedeemRequest::new(&b.0, "app").ip(ip))
        .unwrap()
        .accepted()
        .unwrap();
    assert_eq!(e.subjects.len(), 3);
    armed.store(true, Ordering::SeqCst);
    assert!(e.revoke_family(a.1).is_err());
    assert_eq!(e.subjects.len(), 2, "a unindexed");
    assert!(
        e.redeem(&RedeemRequest::new(&b.0, "app").ip(ip)).is_err(),
        "reuse, then the write fails"
    );
    assert_eq!(e.subjects.len(), 1, "b unindexed");
    assert!(e.revoke_client("app").is_err());
    assert_eq!(e.subjects.len(), 0, "c unindexed");
    let revoked = |id| e.family_record(id).unwrap().status() != Status::Active;
    assert!(revoked(a.1) && revoked(b.1) && revoked(c.1));
}

/// A family revoked for reuse leaves the subject index, whatever else
/// `on_reuse` revokes; reported-only reuse leaves it indexed.
#[test]
fn reuse_revocation_unindexes_the_family() {
    use crate::policy::{OnReuse, PolicyOverrides, PolicySet};
    for (on_reuse, indexed) in [
        (OnReuse::RevokeFamily, 0),
        (OnReuse::RevokeSubjectClient, 0),
        (OnReuse::RevokeSubject, 0),
        (OnReuse::ReportOnly, 1),
    ] {
        let e = Engine::builder()
            .policies(
                PolicySet::builder()
                    .defaults(PolicyOverrides::new().on_reuse(on_reuse))
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let (t1, _) = issue_to(&e, "alice");
        e.redeem(&RedeemRequest::new(&t1, "app").ip(ip))
            .unwrap()
            .accepted()
            .unwrap();
        let d = e.redeem(&RedeemRequest::new(&t1, "app").ip(ip)).unwrap();
        assert_eq!(d.deny_reason(), Some(DenyReason::ReuseDetected));
        assert_eq!(e.subjects.len(), indexed, "{on_reuse:?}");
    }
}

/// A restore that gives a family another subject moves its index entry,
/// also when the two subjects collide in the index.
#[test]
fn restore_under_another_subject_moves_the_index_entry() {
    for colliding in [false, true] {
        let mut e = Engine::builder().build().unwrap();
        if colliding {
            e.subjects = SubjectIndex::colliding(4);
        }
        let (_, id) = issue_to(&e, "x");
        let mut record = e.family_record(id).unwrap();
        record.0.subject = SubjectName::new("y");
        e.restore_family(record).unwrap();
        assert_eq!(e.subjects.len(), 1, "one entry, colliding: {colliding}");
        assert_eq!(
            e.revoke_subject("x", None).unwrap(),
            0,
            "colliding: {colliding}"
        );
        assert_eq!(
            e.revoke_subject("y", None).unwrap(),
            1,
            "colliding: {colliding}"
        );
    }
}

/// Recovery into fewer shards than wrote the store (a smaller machine):
/// each merged shard has colliding slots, yet only the colliding
/// families leave their own slot, and every token still works.
#[cfg(feature = "durable")]
#[test]
fn recovery_into_fewer_shards_overflows_only_collisions() {
    use crate::store::{LogOptions, LogStore};
    let dir = std::env::temp_dir().join(format!("rg-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let keys = KeyRing::new(
        crate::token::KeyId(1),
        &crate::token::KeySecret::from_bytes([5; 32]),
    );
    let open = |shards| {
        Engine::builder()
            .keys(keys.clone())
            .shards(shards)
            .store(LogStore::open(&dir, LogOptions::default()).unwrap())
            .build()
            .unwrap()
    };
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let tokens: Vec<Token> = {
        let e = open(2);
        (0..1000)
            .map(|i| {
                let subject = format!("s{i}");
                e.issue(&IssueRequest {
                    client: "c",
                    subject: &subject,
                    scope: "",
                    ip: Some(ip),
                })
                .unwrap()
                .accepted()
                .unwrap()
                .token
            })
            .collect()
    };
    let e = open(1);
    // Two shards of ~500 merge: about half of the families collide.
    let overflow = e.table.lock_shard(0).overflow_len();
    assert!(overflow <= 600, "{overflow} of 1000 out of their slot");
    for t in &tokens {
        assert!(
            e.redeem(&RedeemRequest::new(t, "c").ip(ip))
                .unwrap()
                .accepted()
                .is_some()
        );
    }
    drop(e);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An engine capped at `cap` whose store fails once armed, and its events.
fn failing(cap: u32) -> (Engine, Arc<std::sync::atomic::AtomicBool>, Arc<MemorySink>) {
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sink = Arc::new(MemorySink::new());
    let e = capped(cap)
        .store(FailingStore {
            armed: armed.clone(),
            lsn: AtomicU64::new(0),
        })
        .events(sink.clone())
        .build()
        .unwrap();
    (e, armed, sink)
}

/// Whether `events` hold `kind` for family `id`.
fn reported(events: &[crate::event::Event], id: FamilyId, kind: &EventKind) -> bool {
    events
        .iter()
        .any(|ev| ev.family == Some(id) && ev.kind == *kind)
}

/// A family revoked for reuse whose store write fails still reports
/// `family_revoked`: every revocation leaves its lock through one
/// `Revocation::finish`, which unindexes and emits before it returns the
/// store's error. Reuse used to return the error first and emit nothing.
#[test]
fn failed_reuse_revocation_write_still_reports_family_revoked() {
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let (e, armed, sink) = failing(0);
    let (old, id) = issue_to(&e, "alice");
    e.redeem(&RedeemRequest::new(&old, "app").ip(ip))
        .unwrap()
        .accepted()
        .unwrap();
    armed.store(true, Ordering::SeqCst);
    assert!(e.redeem(&RedeemRequest::new(&old, "app").ip(ip)).is_err());
    let revoked = EventKind::FamilyRevoked {
        reason: RevokeReason::ReuseDetected,
    };
    assert!(reported(&sink.take(), id, &revoked));
}

/// A cap eviction whose store write fails still reports `cap_eviction`
/// and `family_revoked` (see
/// `failed_reuse_revocation_write_still_reports_family_revoked`); it used
/// to return the error first and emit nothing for the evicted family.
#[test]
fn failed_cap_eviction_write_still_reports_the_eviction() {
    let (e, armed, sink) = failing(1);
    let (_, id) = issue_to(&e, "alice");
    armed.store(true, Ordering::SeqCst);
    let again = e.issue(&IssueRequest {
        client: "app",
        subject: "alice",
        scope: "openid",
        ip: None,
    });
    assert!(again.is_err());
    let events = sink.take();
    assert!(reported(&events, id, &EventKind::CapEviction { cap: 1 }));
    let revoked = EventKind::FamilyRevoked {
        reason: RevokeReason::CapEviction,
    };
    assert!(reported(&events, id, &revoked), "{events:?}");
}

/// A code replay whose revocation write fails still reports
/// `family_revoked` (see
/// `failed_reuse_revocation_write_still_reports_family_revoked`); it used
/// to return the error first and emit nothing.
#[test]
fn failed_code_replay_revocation_write_still_reports_family_revoked() {
    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
    let (e, armed, sink) = failing(0);
    let code = e
        .authorize(&AuthorizeRequest {
            client: "app",
            subject: "alice",
            scope: "openid",
            redirect_uri: "https://a/cb",
            code_challenge: Some(CHALLENGE),
            code_challenge_method: Some("S256"),
            ip: None,
            dpop_jkt: None,
        })
        .unwrap();
    let code = code.accepted().unwrap();
    let exchange = ExchangeRequest {
        code: &code.token,
        code_verifier: Some(VERIFIER),
        client: "app",
        redirect_uri: "https://a/cb",
        ip: None,
        dpop: None,
    };
    e.exchange(&exchange).unwrap().accepted().unwrap();
    armed.store(true, Ordering::SeqCst);
    assert!(e.exchange(&exchange).is_err());
    let revoked = EventKind::FamilyRevoked {
        reason: RevokeReason::CodeReplay,
    };
    assert!(reported(&sink.take(), code.family, &revoked));
}

/// An acceptance hands the family's grant out by its count, and that
/// count is shared only with the families of the same stripe: two
/// families of one client and scope in different stripes hold different
/// grants, and accepting one leaves the other's count alone. A grant
/// shared by all of a client's families made every redemption, on every
/// core, write one reference count.
#[test]
fn an_acceptance_shares_its_grants_count_only_within_a_stripe() {
    let e = Engine::builder().build().unwrap();
    let scope = "openid profile email offline_access";
    let grant_of = |id: &FamilyId| e.table.lock(id).get(id).unwrap().grant.clone();
    let (t, id) = issue_scoped(&e, "alice", scope);
    // Another family of the same pair in another stripe.
    let other = (0..1000)
        .map(|i| issue_scoped(&e, &format!("user-{i}"), scope).1)
        .find(|o| crate::table::stripe_of(o) != crate::table::stripe_of(&id))
        .expect("1000 families fill more than one stripe");
    let (mine, theirs) = (grant_of(&id), grant_of(&other));
    assert!(!Arc::ptr_eq(&mine, &theirs), "one grant for both stripes");
    let before = Arc::strong_count(&theirs);
    let d = e
        .redeem(&RedeemRequest::new(&t, "app").ip("10.0.0.1".parse::<IpAddr>().unwrap()))
        .unwrap();
    let a = d.accepted().unwrap();
    assert_eq!(a.scope(), scope);
    assert_eq!(a.client(), "app");
    assert_eq!(
        Arc::strong_count(&theirs),
        before,
        "the other stripe's count moved"
    );
    assert!(
        Arc::ptr_eq(&a.grant, &mine),
        "the acceptance carries its family's grant"
    );
}

/// A sweep budget larger than the table examines the table once and
/// returns: `sweep(usize::MAX)` used to go round the table under the
/// cursor lock forever (and the slot arithmetic could overflow).
#[test]
fn a_sweep_budget_beyond_the_table_makes_one_pass_and_returns() {
    let e = Arc::new(Engine::builder().shards(4).build().unwrap());
    for i in 0..10 {
        issue_to(&e, &format!("user-{i}"));
    }
    // Start mid-table, so the pass wraps.
    e.sweep(3).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let sweeper = e.clone();
    std::thread::spawn(move || tx.send(sweeper.sweep(usize::MAX)));
    let report = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("sweep(usize::MAX) did not return")
        .unwrap();
    assert_eq!(report.removed, 0);
    assert!(report.examined >= 10, "{report:?}");
}
