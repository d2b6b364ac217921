//! Shared by the store tests: private temporary directories and a store
//! wrapper that records the LSN of each change.
#![allow(dead_code)]

use std::cell::Cell;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use refresh_guard::{
    AcceptKind, Durability, Engine, Error, FamilyId, IssueRequest, KeyId, KeyRing, KeySecret,
    LogOptions, LogStore, RecordRef, Snapshot, Store, StoredRecord, Token,
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
        ip: ip(),
    })
    .unwrap()
    .accepted()
    .unwrap()
    .token
}

pub fn rotate(e: &Engine, t: &str) -> Token {
    let d = e.redeem(t, CLIENT, ip()).unwrap();
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
