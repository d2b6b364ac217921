//! The embedded store under faults, made deterministic with failpoints in
//! its writer: compaction racing a batch the writer holds, and writes that
//! fail. Nothing may be acknowledged before it is written and synced, and a
//! failure fails the store closed.

mod store_support;

use std::sync::Arc;

use refresh_guard::RedeemRequest;
use refresh_guard::{DenyReason, Engine, LogOptions, LogStore, Store};
use store_support::*;

/// A store with failpoints, the engine on it, and the test's handles.
fn hooked(dir: &std::path::Path) -> (Arc<Failpoint>, Arc<LogStore>, Recording, Engine) {
    let fp = Arc::new(Failpoint::default());
    let store =
        Arc::new(LogStore::open_with_hooks(dir, LogOptions::default(), fp.clone()).unwrap());
    let rec = Recording::new(store.clone());
    let e = engine(rec.clone());
    (fp, store, rec, e)
}

/// Compaction while the writer holds a batch it has taken and not written:
/// nothing of that batch may be published until the writer wrote and synced
/// it. Then the writer's write succeeds (`fail: false`) or fails.
fn compaction_races_a_taken_batch(fail: bool) {
    let dir = temp_dir("compact-race");
    let (fp, store, rec, e) = hooked(&dir);
    let unpause = fp.release_on_drop();
    let t1 = issue(&e, "alice");
    fp.pause_next_batch();
    let (answer, compacted) = std::thread::scope(|s| {
        let redeem = s.spawn(|| e.redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip())));
        // The writer took the batch holding alice's rotation.
        let lsn = fp.wait_paused();
        let compact = s.spawn(|| e.compact());
        // Compaction either ran to its end, or asked the writer for a new
        // segment and waits for it: either way it did all it can before
        // the writer goes on.
        until("compaction finished or waiting for the writer", || {
            compact.is_finished() || fp.rotation_requested()
        });
        assert!(
            !is_durable(&store, lsn),
            "LSN {lsn} was published while the writer still held it unwritten"
        );
        if fail {
            fp.release_failing();
        } else {
            fp.release();
        }
        let answer = redeem.join().unwrap();
        if !fail {
            assert!(is_durable(&store, lsn));
        }
        (answer, compact.join().unwrap())
    });
    drop(unpause);
    // Every handle, so the store's directory lock is released.
    drop((e, rec));
    drop(store);
    let e = open(&dir);
    match (fail, answer) {
        (false, Ok(d)) => {
            compacted.unwrap();
            let t2 = d.accepted().unwrap().token;
            assert_eq!(
                e.redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip()))
                    .unwrap()
                    .deny_reason(),
                Some(DenyReason::ReuseDetected)
            );
            let _ = t2;
        }
        (true, Err(_)) => {
            assert!(compacted.is_err(), "compaction must fail with the store");
            // Never acknowledged, never written: the client still holds t1
            // and it is still the current token.
            rotate(&e, &t1);
        }
        (fail, answer) => panic!("fail={fail}: unexpected answer {answer:?}"),
    }
}

/// Regression: compaction published an LSN past a batch the writer had
/// taken but not yet written (the writer released the buffer's lock before
/// locking the segment, and compaction published `boundary - 1`), so a
/// sync-mode rotation was acknowledged before it was on disk.
#[test]
fn compaction_does_not_publish_a_batch_the_writer_has_not_written() {
    compaction_races_a_taken_batch(false);
}

/// Regression (same race): when the held batch then never reaches the disk
/// (a crash; here a failed write), its rotation was already acknowledged,
/// and a restart made the spent token redeemable again. It must be
/// answered with an error instead.
#[test]
fn a_held_batch_that_fails_after_compaction_is_never_acknowledged() {
    compaction_races_a_taken_batch(true);
}

/// Regression: a failed compaction write dropped the records it had taken
/// from the buffer (`mem::take` then `write_all(...)?`); later LSNs were
/// published past them, so the caller waiting for one was acknowledged and
/// a clean restart resurrected the spent token. Any failed write now fails
/// the store closed: that caller, every later change and wait, compaction
/// and flush get an error, and nothing is published past the lost records.
#[test]
fn a_failed_write_during_compaction_fails_the_store_closed() {
    let dir = temp_dir("compact-fail");
    let (fp, store, rec, e) = hooked(&dir);
    let unpause = fp.release_on_drop();
    let (ta, tb, tc) = (issue(&e, "alice"), issue(&e, "bob"), issue(&e, "carol"));
    fp.pause_next_batch();
    let (a, b, d, c) = std::thread::scope(|s| {
        let a = s.spawn(|| e.redeem(&RedeemRequest::new(&ta, CLIENT).ip(ip())));
        let lsn_a = fp.wait_paused();
        // Bob's rotation waits in the buffer behind alice's batch.
        let b = s.spawn(|| e.redeem(&RedeemRequest::new(&tb, CLIENT).ip(ip())));
        until("bob's rotation appended", || rec.appended() > lsn_a);
        let lsn_b = rec.appended();
        fp.fail_next_write();
        let compact = s.spawn(|| e.compact());
        until("compaction finished or waiting for the writer", || {
            compact.is_finished() || fp.rotation_requested()
        });
        fp.release();
        let a = a.join().unwrap();
        // A later change must neither succeed nor publish past bob's record.
        let d = e.redeem(&RedeemRequest::new(&tc, CLIENT).ip(ip()));
        assert!(
            !is_durable(&store, lsn_b),
            "LSN {lsn_b} was published though its write failed"
        );
        (a, b.join().unwrap(), d, compact.join().unwrap())
    });
    let ta2 = a
        .expect("alice's batch was written")
        .accepted()
        .unwrap()
        .token;
    assert!(
        d.is_err(),
        "a change after a failed write was accepted: {d:?}"
    );
    assert!(
        b.is_err(),
        "bob's rotation was acknowledged though its write failed: {b:?}"
    );
    assert!(c.is_err(), "compaction must fail with the store");
    // Fail closed from now on: changes, waits and flushes all error.
    assert!(
        e.redeem(&RedeemRequest::new(&ta2, CLIENT).ip(ip()))
            .is_err()
    );
    assert!(store.wait_durable(rec.appended()).is_err());
    assert!(e.flush().is_err());
    assert!(e.compact().is_err());
    drop(unpause);
    // Every handle, so the store's directory lock is released.
    drop((e, rec));
    drop(store);
    // What was acknowledged is there; what was not, was not done.
    let e = open(&dir);
    rotate(&e, &ta2);
    rotate(&e, &tb);
    rotate(&e, &tc);
}

/// A writer whose write fails with no compaction involved fails the store
/// closed the same way: the caller, every later change and every waiter get
/// an error, and a restart has exactly what was acknowledged.
#[test]
fn a_failed_write_fails_the_store_closed() {
    let dir = temp_dir("write-fail");
    let (fp, store, rec, e) = hooked(&dir);
    let (ta, tb) = (issue(&e, "alice"), issue(&e, "bob"));
    fp.fail_next_write();
    assert!(e.redeem(&RedeemRequest::new(&ta, CLIENT).ip(ip())).is_err());
    let failed = rec.appended();
    assert!(!is_durable(&store, failed));
    assert!(matches!(
        store.poll_durable(failed, std::task::Waker::noop()),
        std::task::Poll::Ready(Err(_))
    ));
    assert!(e.redeem(&RedeemRequest::new(&tb, CLIENT).ip(ip())).is_err());
    // Every handle, so the store's directory lock is released.
    drop((e, rec));
    drop(store);
    let e = open(&dir);
    rotate(&e, &ta);
    rotate(&e, &tb);
}

/// A store error from the operating system keeps that error as its
/// `source()`: `Error::Store` used to hold only its text, so an embedder
/// could not tell a full disk from a permission problem without parsing it.
#[test]
fn store_errors_keep_their_io_cause() {
    use std::error::Error as _;
    let dir = temp_dir("io-cause");
    // A regular file where the store's directory should be.
    let blocker = dir.join("blocker");
    std::fs::write(&blocker, b"").unwrap();
    let err = match LogStore::open(blocker.join("store"), LogOptions::default()) {
        Ok(_) => panic!("a store under a regular file opened"),
        Err(e) => e,
    };
    let cause = err
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .unwrap_or_else(|| panic!("no io::Error under {err:?}"));
    assert!(err.to_string().contains(&cause.to_string()), "{err}");
}

/// A first DPoP binding that comes with a `rotation = "reuse"` acceptance
/// is waited for like a rotation: a kept token's acceptance alone is not
/// (losing it only makes the family look idle sooner), but a lost binding
/// would leave the family for the next proof's key to claim. With the
/// binding's write failing, the redemption must fail, not be acknowledged.
#[test]
fn a_first_binding_with_a_kept_token_waits_for_its_write() {
    use refresh_guard::{AcceptKind, Dpop, Jkt, PolicyOverrides, PolicySet, Rotation};
    let dir = temp_dir("bind-keep");
    let fp = Arc::new(Failpoint::default());
    let store =
        Arc::new(LogStore::open_with_hooks(&*dir, LogOptions::default(), fp.clone()).unwrap());
    let kept_and_bound = || {
        PolicySet::builder()
            .client(
                CLIENT,
                PolicyOverrides::new()
                    .rotation(Rotation::Reuse)
                    .dpop(Dpop::Required),
            )
            .build()
            .unwrap()
    };
    let e = Engine::builder()
        .keys(keys())
        .policies(kept_and_bound())
        .store(Recording::new(store.clone()))
        .build()
        .unwrap();
    let t = issue(&e, "alice");
    let key = Jkt::from_bytes([7; 32]);
    fp.fail_next_write();
    let answer = e.redeem(&RedeemRequest::new(&t, CLIENT).ip(ip()).dpop(key));
    assert!(
        answer.is_err(),
        "a binding whose write failed was acknowledged: {answer:?}"
    );
    drop(e);
    drop(store);
    // Nothing was acknowledged, nothing bound: the family binds to the key
    // of its next proof.
    let e = Engine::builder()
        .keys(keys())
        .policies(kept_and_bound())
        .store(LogStore::open(&*dir, LogOptions::default()).unwrap())
        .build()
        .unwrap();
    let d = e
        .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip()).dpop(key))
        .unwrap();
    assert_eq!(d.accepted().map(|a| a.kind), Some(AcceptKind::Kept));
}
