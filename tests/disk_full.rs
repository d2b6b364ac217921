//! A full disk, injected at the store's file layer (`LogHooks::write`): a
//! write takes what still fits and fails with `ENOSPC`. The store fails
//! closed, nothing acknowledged is lost, and once space returns a restart
//! serves every acknowledged state (docs/store.md "Writing and
//! acknowledging").

mod store_support;

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use refresh_guard::{Engine, Error, IssueRequest, LogHooks, LogOptions, LogStore};
use store_support::*;

/// A disk with a given number of bytes left.
#[derive(Default)]
struct Disk {
    state: Mutex<DiskState>,
}

#[derive(Default)]
struct DiskState {
    /// Bytes that still fit; `None`: plenty.
    room: Option<usize>,
}

impl Disk {
    fn room(&self, room: Option<usize>) {
        self.state.lock().unwrap().room = room;
    }
}

impl LogHooks for Disk {
    /// What fits lands; the rest fails as write(2) fails on a full disk.
    fn write(&self, _path: &Path, file: &mut File, buf: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
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
    let (disk, _rec, e) = on_disk(&dir);
    let (ta, tb) = (issue(&e, "alice"), issue(&e, "bob"));
    let ta = rotate(&e, &ta);
    disk.room(Some(0));
    assert_no_space(
        "a rotation on a full disk",
        e.redeem(&ta, CLIENT, ip()),
        ".rgl",
    );
    assert!(e.redeem(&tb, CLIENT, ip()).is_err());
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
        e.redeem(&tb, CLIENT, ip()),
        ".rgl",
    );
    drop(e);
    let e = open(&dir);
    rotate(&e, &ta);
    rotate(&e, &tb);
}

/// A compaction whose snapshot does not fit fails alone: its error names
/// ENOSPC and the snapshot file, no partial snapshot is left, and the
/// store goes on once space returns, without a restart; a restart then
/// serves every acknowledged state.
#[test]
fn a_snapshot_that_does_not_fit_fails_only_its_compaction() {
    let dir = temp_dir("disk-full-snapshot");
    let (disk, _rec, e) = on_disk(&dir);
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
    drop(e);
    let e = open(&dir);
    rotate(&e, &ta);
    rotate(&e, &tb);
}
