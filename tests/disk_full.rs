//! A full disk, injected at the store's file layer (`LogHooks::write`): a
//! write takes what still fits and fails with `ENOSPC`. The store fails
//! closed, nothing acknowledged is lost, and once space returns a restart
//! serves every acknowledged state (docs/store.md "Writing and
//! acknowledging").

mod store_support;

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use refresh_guard::RedeemRequest;
use refresh_guard::{DenyReason, Engine, Error, IssueRequest, LogHooks, LogOptions, LogStore};
use store_support::*;

/// A disk with a given number of bytes left, and a writer that can be
/// paused after it takes a batch.
#[derive(Default)]
struct Disk {
    state: Mutex<DiskState>,
    changed: Condvar,
}

#[derive(Default)]
struct DiskState {
    /// Bytes that still fit; `None`: plenty.
    room: Option<usize>,
    /// Bytes of the last write asked for.
    last_write: usize,
    pause_next: bool,
    paused: bool,
    release: bool,
}

impl Disk {
    fn room(&self, room: Option<usize>) {
        self.state.lock().unwrap().room = room;
    }

    fn last_write(&self) -> usize {
        self.state.lock().unwrap().last_write
    }

    fn pause_next_batch(&self) {
        self.state.lock().unwrap().pause_next = true;
    }

    fn wait_paused(&self) {
        let s = self.state.lock().unwrap();
        let (_s, t) = self
            .changed
            .wait_timeout_while(s, Duration::from_secs(30), |s| !s.paused)
            .unwrap();
        assert!(!t.timed_out(), "the writer never paused");
    }

    fn release(&self) {
        self.state.lock().unwrap().release = true;
        self.changed.notify_all();
    }
}

impl LogHooks for Disk {
    fn before_write(&self, _last: u64) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if std::mem::take(&mut s.pause_next) {
            s.paused = true;
            self.changed.notify_all();
            s = self.changed.wait_while(s, |s| !s.release).unwrap();
            s.release = false;
            s.paused = false;
        }
        Ok(())
    }

    /// What fits lands; the rest fails as write(2) fails on a full disk.
    fn write(&self, _path: &Path, file: &mut File, buf: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.last_write = buf.len();
        let Some(room) = s.room else {
            return file.write_all(buf);
        };
        let n = room.min(buf.len());
        file.write_all(&buf[..n])?;
        s.room = Some(room - n);
        if n < buf.len() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
}

/// A store on a [`Disk`], and the engine on it.
fn on_disk(dir: &Path) -> (Arc<Disk>, Recording, Engine) {
    let disk = Arc::new(Disk::default());
    let store =
        Arc::new(LogStore::open_with_hooks(dir, LogOptions::default(), disk.clone()).unwrap());
    let rec = Recording::new(store);
    let e = engine(rec.clone());
    (disk, rec, e)
}

/// The error says the disk is full, and where.
fn assert_no_space(what: &str, r: Result<impl std::fmt::Debug, Error>, file: &str) {
    let err = r.expect_err(what);
    let text = err.to_string();
    assert!(
        matches!(err, Error::Store { .. })
            && text.contains("No space left on device")
            && text.contains(file),
        "{what}: {text}"
    );
}

/// The disk fills up: the rotation that does not fit is refused with an
/// error naming ENOSPC and the segment, and so is every later change,
/// flush and compaction (fail closed: nothing is answered that is not on
/// disk). Once space returns, a restart serves every acknowledged state,
/// and the refused rotation never happened.
#[test]
fn a_full_disk_fails_the_store_closed_and_loses_nothing_acknowledged() {
    let dir = temp_dir("disk-full");
    let (disk, rec, e) = on_disk(&dir);
    let (ta, tb) = (issue(&e, "alice"), issue(&e, "bob"));
    let ta = rotate(&e, &ta);
    disk.room(Some(0));
    assert_no_space(
        "a rotation on a full disk",
        e.redeem(&RedeemRequest::new(&ta, CLIENT).ip(ip())),
        ".rgl",
    );
    assert!(e.redeem(&RedeemRequest::new(&tb, CLIENT).ip(ip())).is_err());
    let carol = IssueRequest {
        client: CLIENT,
        subject: "carol",
        scope: "openid",
        ip: Some(ip()),
    };
    assert!(e.issue(&carol).is_err());
    assert!(e.flush().is_err());
    assert!(e.compact().is_err());
    // Space returns; the failed store stays failed until the restart.
    disk.room(None);
    assert_no_space(
        "a change after the failure",
        e.redeem(&RedeemRequest::new(&tb, CLIENT).ip(ip())),
        ".rgl",
    );
    // Every handle, so the store's directory lock is released.
    drop((e, rec));
    let e = open(&dir);
    rotate(&e, &ta);
    rotate(&e, &tb);
}

/// Regression: a batch that a full disk cut short left its whole records
/// in the segment. Their callers were answered with an error and kept
/// their previous tokens, yet a restart replayed those records, so the
/// previous tokens were spent: presenting them was reuse, and revoked the
/// family. The failed batch is now cut off the segment.
#[test]
fn a_batch_cut_short_by_a_full_disk_leaves_nothing_behind() {
    let dir = temp_dir("disk-full-cut");
    let (disk, rec, e) = on_disk(&dir);
    let (ta, tb, tc) = (issue(&e, "s-a"), issue(&e, "s-b"), issue(&e, "s-c"));
    let ta = rotate(&e, &ta);
    let record = disk.last_write();
    let unpause = ReleaseOnDrop(&disk);
    disk.pause_next_batch();
    let (a, b, c) = std::thread::scope(|s| {
        let a = s.spawn(|| e.redeem(&RedeemRequest::new(&ta, CLIENT).ip(ip())));
        disk.wait_paused();
        let held = rec.appended();
        // Bob's and carol's rotations make the next batch.
        let b = s.spawn(|| e.redeem(&RedeemRequest::new(&tb, CLIENT).ip(ip())));
        until("bob's rotation appended", || rec.appended() > held);
        let c = s.spawn(|| e.redeem(&RedeemRequest::new(&tc, CLIENT).ip(ip())));
        until("carol's rotation appended", || rec.appended() > held + 1);
        // Room for alice's batch, bob's record and half of carol's.
        disk.room(Some(2 * record + record / 2));
        disk.release();
        (a.join().unwrap(), b.join().unwrap(), c.join().unwrap())
    });
    let ta = a.unwrap().accepted().expect("alice's batch fit").token;
    assert_no_space("bob's rotation, in the cut batch", b, ".rgl");
    assert_no_space("carol's rotation, in the cut batch", c, ".rgl");
    drop(unpause);
    drop(e);
    drop(rec);
    let e = open(&dir);
    rotate(&e, &ta);
    // Bob and carol were refused, so they still hold their tokens: these
    // must be current, not spent.
    for (who, t) in [("bob", &tb), ("carol", &tc)] {
        let d = e.redeem(&RedeemRequest::new(t, CLIENT).ip(ip())).unwrap();
        assert_ne!(d.deny_reason(), Some(DenyReason::ReuseDetected), "{who}");
        assert!(d.accepted().is_some(), "{who}: {d:?}");
    }
}

/// A compaction whose snapshot does not fit fails alone: its error names
/// ENOSPC and the snapshot file, no partial snapshot is left, and the
/// store goes on once space returns, without a restart; a restart then
/// serves every acknowledged state.
#[test]
fn a_snapshot_that_does_not_fit_fails_only_its_compaction() {
    let dir = temp_dir("disk-full-snapshot");
    let (disk, rec, e) = on_disk(&dir);
    let ta = issue(&e, "alice");
    let ta = rotate(&e, &ta);
    disk.room(Some(0));
    assert_no_space("a snapshot on a full disk", e.compact(), "snapshot-");
    let leftovers: Vec<_> = std::fs::read_dir(&*dir)
        .unwrap()
        .map(|f| f.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with("snapshot-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    disk.room(None);
    let ta = rotate(&e, &ta);
    e.compact().unwrap();
    let tb = issue(&e, "bob");
    // Every handle, so the store's directory lock is released.
    drop((e, rec));
    let e = open(&dir);
    rotate(&e, &ta);
    rotate(&e, &tb);
}

/// Lets a paused writer go if the test fails while it is paused, so the
/// store's drop (which waits for the writer) does not hang.
struct ReleaseOnDrop<'a>(&'a Disk);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}
