//! Shared by the store tests: private temporary directories, a store
//! wrapper that records the LSN of each change, and failpoints that put
//! the log writer at an exact step.
#![allow(dead_code)]

use std::cell::Cell;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use refresh_guard::RedeemRequest;
use refresh_guard::{
    AcceptKind, Durability, Engine, Error, FamilyId, IssueRequest, KeyId, KeyRing, KeySecret,
    LogHooks, LogOptions, LogStore, RecordRef, Snapshot, Store, StoredRecord, Token,
};

pub const CLIENT: &str = "app";

pub fn ip() -> IpAddr {
    "10.0.0.1".parse().unwrap()
}

pub fn keys() -> KeyRing {
    KeyRing::new(KeyId(1), &KeySecret::from_bytes([7; 32]))
}

/// A directory (mode 0700, as the store requires) removed when the test
/// ends.
pub struct TempDir(pub PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(name: &str) -> TempDir {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "refresh-guard-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&d)
        .unwrap();
    TempDir(d)
}

pub fn open(dir: &Path) -> Engine {
    Engine::builder()
        .keys(keys())
        .store(LogStore::open(dir, LogOptions::default()).unwrap())
        .build()
        .unwrap()
}

pub fn engine(store: impl Store) -> Engine {
    Engine::builder().keys(keys()).store(store).build().unwrap()
}

pub fn issue(e: &Engine, subject: &str) -> Token {
    e.issue(&IssueRequest {
        client: CLIENT,
        subject,
        scope: "openid",
        ip: Some(ip()),
    })
    .unwrap()
    .accepted()
    .unwrap()
    .token
}

pub fn rotate(e: &Engine, t: &str) -> Token {
    let d = e.redeem(&RedeemRequest::new(t, CLIENT).ip(ip())).unwrap();
    let a = d.accepted().unwrap_or_else(|| panic!("{d:?}"));
    assert_eq!(a.kind, AcceptKind::Rotated);
    a.token
}

/// The segment files of a store directory, oldest first.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rgl"))
        .collect();
    v.sort();
    v
}

/// Whether `lsn` is published as durable (asked without waiting).
pub fn is_durable(store: &LogStore, lsn: u64) -> bool {
    matches!(store.poll_durable(lsn, Waker::noop()), Poll::Ready(Ok(())))
}

/// Poll `cond` until it holds; a test that waits 30 s is stuck.
pub fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

thread_local! {
    static LAST_LSN: Cell<u64> = const { Cell::new(0) };
}

/// A store that hands everything to a [`LogStore`] the test shares, and
/// records the LSN of each change: per thread (the engine appends on the
/// caller's thread) and the highest overall.
#[derive(Clone)]
pub struct Recording {
    pub store: Arc<LogStore>,
    appended: Arc<AtomicU64>,
}

impl Recording {
    pub fn new(store: Arc<LogStore>) -> Recording {
        Recording {
            store,
            appended: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The LSN of the last change appended on this thread.
    pub fn last_on_this_thread() -> u64 {
        LAST_LSN.with(Cell::get)
    }

    /// The highest LSN appended so far.
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::SeqCst)
    }

    fn record(&self, lsn: u64) -> u64 {
        LAST_LSN.with(|c| c.set(lsn));
        self.appended.fetch_max(lsn, Ordering::SeqCst);
        lsn
    }
}

impl Store for Recording {
    fn recover(&self) -> Result<Vec<StoredRecord>, Error> {
        self.store.recover()
    }
    fn put(&self, record: RecordRef<'_>) -> Result<u64, Error> {
        self.store.put(record).map(|l| self.record(l))
    }
    fn remove(&self, id: FamilyId, expected_lsn: u64) -> Result<u64, Error> {
        self.store.remove(id, expected_lsn).map(|l| self.record(l))
    }
    fn wait_durable(&self, lsn: u64) -> Result<(), Error> {
        self.store.wait_durable(lsn)
    }
    fn poll_durable(&self, lsn: u64, waker: &Waker) -> Poll<Result<(), Error>> {
        self.store.poll_durable(lsn, waker)
    }
    fn durability(&self) -> Durability {
        self.store.durability()
    }
    fn compact(&self, snapshot: &mut Snapshot<'_>) -> Result<(), Error> {
        self.store.compact(snapshot)
    }
    fn flush(&self) -> Result<(), Error> {
        self.store.flush()
    }
}

/// Failpoints in the log writer: pause it after it takes its next batch,
/// fail its next write, and record how far the log is written and synced.
#[derive(Default)]
pub struct Failpoint {
    state: Mutex<FailState>,
    changed: Condvar,
}

#[derive(Default)]
struct FailState {
    pause_next: bool,
    /// The last LSN of the batch the writer is paused on.
    paused: Option<u64>,
    release: bool,
    /// The paused write fails when released.
    fail_paused: bool,
    fail_next: bool,
    synced: u64,
    rotation_requested: bool,
}

impl Failpoint {
    /// The writer pauses after it takes its next batch, before writing it.
    pub fn pause_next_batch(&self) {
        self.state.lock().unwrap().pause_next = true;
    }

    /// Wait until the writer is paused; the last LSN of its batch.
    pub fn wait_paused(&self) -> u64 {
        let s = self.state.lock().unwrap();
        let (s, timeout) = self
            .changed
            .wait_timeout_while(s, Duration::from_secs(30), |s| s.paused.is_none())
            .unwrap();
        assert!(!timeout.timed_out(), "the writer never paused");
        s.paused.unwrap()
    }

    /// Let the paused writer go on and write its batch.
    pub fn release(&self) {
        self.state.lock().unwrap().release = true;
        self.changed.notify_all();
    }

    /// Let the paused writer go on, and fail its write of the batch it
    /// holds (a crash before that batch reached the disk).
    pub fn release_failing(&self) {
        let mut s = self.state.lock().unwrap();
        s.release = true;
        s.fail_paused = true;
        self.changed.notify_all();
    }

    /// The writer's next write fails (before any byte of it is written);
    /// a write it is paused on is not its next.
    pub fn fail_next_write(&self) {
        self.state.lock().unwrap().fail_next = true;
    }

    /// A guard that lets a paused writer go when dropped: a test that
    /// panics while the writer is paused then fails instead of hanging in
    /// the store's drop (which waits for the writer). Declare it after the
    /// store and engine, so it is dropped before them.
    pub fn release_on_drop(&self) -> ReleaseOnDrop<'_> {
        ReleaseOnDrop(self)
    }

    /// The highest LSN written and synced.
    pub fn synced(&self) -> u64 {
        self.state.lock().unwrap().synced
    }

    /// Whether a compaction has asked the writer for a new segment.
    pub fn rotation_requested(&self) -> bool {
        self.state.lock().unwrap().rotation_requested
    }
}

/// See [`Failpoint::release_on_drop`].
pub struct ReleaseOnDrop<'a>(&'a Failpoint);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl LogHooks for Failpoint {
    fn before_write(&self, last: u64) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if s.pause_next {
            s.pause_next = false;
            s.paused = Some(last);
            self.changed.notify_all();
            s = self.changed.wait_while(s, |s| !s.release).unwrap();
            s.release = false;
            s.paused = None;
            if std::mem::take(&mut s.fail_paused) {
                return Err(io::Error::other("injected write failure"));
            }
            return Ok(());
        }
        if s.fail_next {
            s.fail_next = false;
            return Err(io::Error::other("injected write failure"));
        }
        Ok(())
    }

    fn synced(&self, last: u64) {
        let mut s = self.state.lock().unwrap();
        s.synced = s.synced.max(last);
    }

    fn rotation_requested(&self) {
        self.state.lock().unwrap().rotation_requested = true;
    }
}
