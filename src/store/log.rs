//! The embedded store: an append-only log of CRC-checked records with
//! snapshot compaction, in one local directory (format, torn tails,
//! repair and permissions: docs/store.md).
//!
//! Files: `log-<first lsn>.rgl` segments and `snapshot-<lsn>.rgs`
//! snapshots, both sequences of records
//! `[len u32][crc32 u32][kind u8][lsn u64][payload]` (little-endian;
//! `len` counts kind, lsn and payload; the CRC covers the same bytes).
//! Recovery replays the newest snapshot, then every segment, applying a
//! record only if its LSN is newer than what it replaces, so a snapshot
//! taken while writes continue is still exact.
//!
//! One writer thread owns the open segment and is the only one to write,
//! sync and publish: appenders copy their record into a shared buffer and
//! return; the writer takes the whole buffer, writes it, fsyncs and only
//! then publishes its last LSN as durable. Everyone who appended while the
//! previous fsync ran shares the next one. A compaction asks the writer to
//! start a new segment after its next batch and waits for it, so nothing
//! but the writer ever publishes, and nothing is published before it is on
//! disk. Any failure to write fails the store closed. In
//! `Batched(interval)` mode the writer first lets records gather for up to
//! `interval` from the first of them (appenders do not wait for durability
//! there), so a crash loses at most the last interval's changes; `flush`,
//! compaction and shutdown cut it short.

mod recover;
mod repair;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::private;
use super::{Durability, RecordRef, Snapshot, Store, StoredRecord};
use crate::error::Error;
use crate::token::FamilyId;

pub use repair::{Dropped, RepairReport, RolledBack};

const PUT: u8 = 1;
const REMOVE: u8 = 2;
const HEADER: usize = 8;
/// No family record comes near this; a longer length field is corruption,
/// not a torn write.
const MAX_RECORD: usize = 64 * 1024;

/// The server keeps its store in this subdirectory of its data directory;
/// `LogStore::repair` accepts either.
pub const LOG_SUBDIR: &str = "log";

/// How the embedded store opens.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// When a change counts as done; `Durability::None` is refused (use no
    /// store at all).
    pub durability: Durability,
}

impl Default for LogOptions {
    fn default() -> LogOptions {
        LogOptions {
            durability: Durability::Sync,
        }
    }
}

/// Failpoints in the log writer, for tests that must act at an exact step
/// of it (pause it between taking a batch and writing it, fail a write,
/// see what is on disk before an acknowledgement). Not a stable interface.
#[doc(hidden)]
pub trait LogHooks: Send + Sync + 'static {
    /// The writer took the records up to LSN `last` from the buffer and is
    /// about to write them. Blocking here pauses the writer at that step;
    /// an error is taken as the write's failure.
    fn before_write(&self, last: u64) -> io::Result<()> {
        let _ = last;
        Ok(())
    }
    /// Records up to `last` are written and synced, not yet published.
    fn synced(&self, last: u64) {
        let _ = last;
    }
    /// A compaction asked the writer for a new segment and now waits.
    fn rotation_requested(&self) {}
    /// Write `buf` to `file` (a segment, or a snapshot's `.tmp`, at
    /// `path`): the file layer, where a test makes a write fail part way
    /// (`ENOSPC` after some bytes landed).
    fn write(&self, path: &Path, file: &mut File, buf: &[u8]) -> io::Result<()> {
        let _ = path;
        file.write_all(buf)
    }
}

/// Every write of records, through the hooks' file layer when there is one.
fn write_file(
    hooks: Option<&dyn LogHooks>,
    path: &Path,
    file: &mut File,
    buf: &[u8],
) -> io::Result<()> {
    match hooks {
        Some(h) => h.write(path, file, buf),
        None => file.write_all(buf),
    }
}

struct Pending {
    buf: Vec<u8>,
    spare: Vec<u8>,
    next_lsn: u64,
    /// First LSN of the open segment: every record before it is in older
    /// segments, written and synced.
    segment_first: u64,
    /// A compaction waits for a new segment after the next batch.
    rotate: bool,
    shutdown: bool,
    /// `flush` asks the batched writer not to wait out its interval.
    flush: bool,
}

struct Shared {
    dir: PathBuf,
    durability: Durability,
    pending: Mutex<Pending>,
    /// Signals the writer that there is work.
    work: Condvar,
    /// Cuts a batched writer's interval short: `flush`, compaction and
    /// shutdown.
    urgent: Condvar,
    /// Signals a waiting compaction that the segment changed or the store
    /// failed.
    rotated: Condvar,
    durable: AtomicU64,
    /// Who waits for which LSN: woken one by one when it is durable, so a
    /// batch wakes exactly the callers it completes.
    waiters: Mutex<Waiters>,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Bytes in the open segment (the writer's count).
    segment_bytes: AtomicU64,
    /// One compaction at a time.
    compacting: Mutex<()>,
    hooks: Option<Arc<dyn LogHooks>>,
}

struct Waiters {
    list: Vec<(u64, Waiter)>,
    /// Set by `fail` under this lock, so a waiter registering after the
    /// failure's wake-up sees it instead of waiting forever.
    failed: bool,
}

enum Waiter {
    Thread(std::thread::Thread),
    Task(Waker),
}

impl Waiter {
    fn wake(self) {
        match self {
            Waiter::Thread(t) => t.unpark(),
            Waiter::Task(w) => w.wake(),
        }
    }
}

/// The open segment, owned by the writer thread.
struct Segment {
    file: File,
    path: PathBuf,
    /// Bytes written and synced: what a failed batch is cut back to.
    len: u64,
}

/// The embedded, durable store. See the module docs for the format.
pub struct LogStore {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    recovered: Mutex<Option<Vec<StoredRecord>>>,
    /// Held for the store's life: see [`lock_dir`].
    _lock: File,
}

/// File name of the store's lock.
const LOCK: &str = "LOCK";

/// How long an open waits for the previous holder of the lock to let go:
/// a process that is exiting, or a child forked by another thread of this
/// one that has not yet reached `exec` (the lock's file description is
/// shared with it until then).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Take the store directory's exclusive lock, or refuse: two processes
/// appending to one log, or a repair cutting a segment a live writer is
/// still appending to, would each lose acknowledged changes. The lock is
/// advisory (`flock`) and the kernel drops it when the process dies, so a
/// crash never leaves the store locked.
fn lock_dir(dir: &Path) -> Result<File, Error> {
    let path = dir.join(LOCK);
    let file = private::file_options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    let started = Instant::now();
    let mut held = file.try_lock();
    while matches!(held, Err(std::fs::TryLockError::WouldBlock)) && started.elapsed() < LOCK_WAIT {
        std::thread::sleep(std::time::Duration::from_millis(10));
        held = file.try_lock();
    }
    match held {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::store(format!(
            "{} is in use by another process (a running server?): stop it first",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path, e)),
    }
}

fn io_err(path: &Path, e: io::Error) -> Error {
    Error::store_io(format!("{}: {e}", path.display()), e)
}

fn seq_name(prefix: &str, lsn: u64, ext: &str) -> String {
    format!("{prefix}-{lsn:020}.{ext}")
}

fn parse_seq(name: &str, prefix: &str, ext: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_prefix('-')?
        .strip_suffix(ext)?
        .strip_suffix('.')?
        .parse()
        .ok()
}

fn frame(out: &mut Vec<u8>, kind: u8, lsn: u64, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    out.push(kind);
    out.extend_from_slice(&lsn.to_le_bytes());
    payload(out);
    let body = &out[start + HEADER..];
    // A record is at most MAX_RECORD bytes (bounded strings), so u32 fits.
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// Create (0600) or reopen the segment whose first LSN is `first`, and make
/// its directory entry durable before any record in it can be
/// acknowledged.
fn open_segment(dir: &Path, first: u64) -> Result<Segment, Error> {
    let path = dir.join(seq_name("log", first, "rgl"));
    let file = private::file_options()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    let len = file.metadata().map_err(|e| io_err(&path, e))?.len();
    sync_dir(dir)?;
    Ok(Segment { file, path, len })
}

impl LogStore {
    /// Open (creating if needed) the store in `dir` and recover its state.
    ///
    /// The directory is created 0700 and its files 0600; a directory other
    /// users can reach, or that another user owns, is refused
    /// ([`Error::Exposed`]). A torn tail of the last segment (an append
    /// cut short by a crash or power loss) is dropped with a log line; any
    /// other unreadable record refuses to open ([`Error::Corrupt`], naming
    /// file and offset and the `refresh-guard store repair` command to
    /// run).
    pub fn open(dir: impl AsRef<Path>, options: LogOptions) -> Result<LogStore, Error> {
        LogStore::open_inner(dir.as_ref(), options, None)
    }

    /// [`open`](Self::open) with failpoints in the writer (tests only).
    #[doc(hidden)]
    pub fn open_with_hooks(
        dir: impl AsRef<Path>,
        options: LogOptions,
        hooks: Arc<dyn LogHooks>,
    ) -> Result<LogStore, Error> {
        LogStore::open_inner(dir.as_ref(), options, Some(hooks))
    }

    fn open_inner(
        dir: &Path,
        options: LogOptions,
        hooks: Option<Arc<dyn LogHooks>>,
    ) -> Result<LogStore, Error> {
        if options.durability == Durability::None {
            return Err(Error::InvalidArgument {
                name: "durability",
                expected: "sync or batched for a store (none means no store)",
            });
        }
        private::create_dir(dir)?;
        let lock = lock_dir(dir)?;
        let (records, max_lsn) = recover::recover_dir(dir)?;
        let next_lsn = max_lsn + 1;
        let segment = open_segment(dir, next_lsn)?;
        let bytes = segment.len;
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            durability: options.durability,
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(1 << 16),
                spare: Vec::with_capacity(1 << 16),
                next_lsn,
                segment_first: next_lsn,
                rotate: false,
                shutdown: false,
                flush: false,
            }),
            work: Condvar::new(),
            urgent: Condvar::new(),
            rotated: Condvar::new(),
            durable: AtomicU64::new(max_lsn),
            waiters: Mutex::new(Waiters {
                list: Vec::with_capacity(256),
                failed: false,
            }),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            segment_bytes: AtomicU64::new(bytes),
            compacting: Mutex::new(()),
            hooks,
        });
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("refresh-guard-log".into())
            .spawn(move || writer_loop(&writer_shared, segment))
            .map_err(|e| Error::store_io(format!("cannot start log writer: {e}"), e))?;
        Ok(LogStore {
            shared,
            writer: Mutex::new(Some(writer)),
            recovered: Mutex::new(Some(records)),
            _lock: lock,
        })
    }

    /// Bytes in the open log segment (for deciding when to compact).
    pub fn segment_bytes(&self) -> u64 {
        self.shared.segment_bytes.load(Ordering::Relaxed)
    }

    fn check(&self) -> Result<(), Error> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(self.shared.failure_error());
        }
        Ok(())
    }

    fn append(&self, kind: u8, payload: impl FnOnce(&mut Vec<u8>)) -> Result<u64, Error> {
        self.check()?;
        let mut p = self.shared.pending.lock();
        let lsn = p.next_lsn;
        p.next_lsn += 1;
        frame(&mut p.buf, kind, lsn, payload);
        drop(p);
        self.shared.work.notify_one();
        Ok(lsn)
    }

    /// Have the writer start a new segment; returns its first LSN, before
    /// which every record is written and synced in older segments.
    fn rotate(&self) -> Result<u64, Error> {
        let s = &self.shared;
        let mut p = s.pending.lock();
        if p.next_lsn > p.segment_first {
            let want = p.next_lsn;
            p.rotate = true;
            s.work.notify_one();
            s.urgent.notify_one();
            if let Some(h) = &s.hooks {
                h.rotation_requested();
            }
            while p.segment_first < want && !s.failed.load(Ordering::Acquire) {
                s.rotated.wait(&mut p);
            }
        }
        if s.failed.load(Ordering::Acquire) {
            return Err(s.failure_error());
        }
        Ok(p.segment_first)
    }
}

impl Shared {
    fn failure_error(&self) -> Error {
        Error::store(
            self.failure
                .lock()
                .clone()
                .unwrap_or_else(|| "store failed".into()),
        )
    }

    /// Fail closed: every waiter, every later change and a waiting
    /// compaction get an error from now on; nothing more is published.
    fn fail(&self, detail: String) {
        tracing::error!(%detail, "store failed; refusing all changes until restart");
        *self.failure.lock() = Some(detail);
        self.failed.store(true, Ordering::Release);
        let woken = {
            let mut w = self.waiters.lock();
            w.failed = true;
            std::mem::take(&mut w.list)
        };
        for (_, w) in woken {
            w.wake();
        }
        // A compaction checks `failed` under this lock before it waits.
        let _p = self.pending.lock();
        self.rotated.notify_all();
    }

    /// Only the writer calls this, after `lsn` is written and synced.
    fn publish(&self, lsn: u64) {
        self.durable.fetch_max(lsn, Ordering::AcqRel);
        let mut waiters = self.waiters.lock();
        let list = &mut waiters.list;
        let mut i = 0;
        while i < list.len() {
            if list[i].0 <= lsn {
                list.swap_remove(i).1.wake();
            } else {
                i += 1;
            }
        }
    }
}

fn writer_loop(s: &Shared, mut seg: Segment) {
    loop {
        let (mut batch, last, rotate) = {
            let mut p = s.pending.lock();
            while p.buf.is_empty() && !p.rotate && !p.shutdown {
                s.work.wait(&mut p);
            }
            if let Durability::Batched(interval) = s.durability
                && !p.buf.is_empty()
            {
                // Let changes accumulate for one interval from the first of
                // them, so none waits longer than that to be durable; a
                // flush, compaction or shutdown ends the wait early.
                let deadline = Instant::now() + interval;
                while !p.shutdown && !p.flush && !p.rotate {
                    if s.urgent.wait_until(&mut p, deadline).timed_out() {
                        break;
                    }
                }
            }
            p.flush = false;
            if p.buf.is_empty() && !p.rotate && p.shutdown {
                return;
            }
            let spare = std::mem::take(&mut p.spare);
            let batch = std::mem::replace(&mut p.buf, spare);
            (batch, p.next_lsn - 1, std::mem::take(&mut p.rotate))
        };
        if let Err(detail) = write_batch(s, &mut seg, &batch, last, rotate) {
            s.fail(detail);
            return;
        }
        batch.clear();
        {
            let mut p = s.pending.lock();
            p.spare = batch;
            if rotate {
                p.segment_first = last + 1;
                s.rotated.notify_all();
            }
        }
        s.publish(last);
    }
}

/// Write and sync the records up to `last`, then, if asked, start the next
/// segment at `last + 1`. Any error leaves the store to fail closed: a
/// partly written batch may be on disk, and nothing after it may be
/// published.
fn write_batch(
    s: &Shared,
    seg: &mut Segment,
    batch: &[u8],
    last: u64,
    rotate: bool,
) -> Result<(), String> {
    let at = |path: &Path, e: io::Error| format!("{}: {e}", path.display());
    if !batch.is_empty() {
        if let Some(h) = &s.hooks {
            h.before_write(last).map_err(|e| at(&seg.path, e))?;
        }
        let written = write_file(s.hooks.as_deref(), &seg.path, &mut seg.file, batch)
            .and_then(|()| seg.file.sync_data());
        if let Err(e) = written {
            cut_failed_batch(seg);
            return Err(at(&seg.path, e));
        }
        seg.len += batch.len() as u64;
        s.segment_bytes.store(seg.len, Ordering::Relaxed);
        if let Some(h) = &s.hooks {
            h.synced(last);
        }
    }
    if rotate {
        *seg = open_segment(&s.dir, last + 1).map_err(|e| e.to_string())?;
        s.segment_bytes.store(0, Ordering::Relaxed);
    }
    Ok(())
}

/// A failed write or sync may have left part of the batch in the file (a
/// write `ENOSPC` cut short, or one whose sync failed): cut it off, so a
/// restart finds only what may have been acknowledged. The batch's callers
/// are answered with an error and still hold their previous tokens
/// (docs/store.md "Writing and acknowledging"); whole records of it left
/// behind would make those tokens spent. Best effort: if this fails too, a
/// restart meets the leftovers as it meets a crash's.
fn cut_failed_batch(seg: &Segment) {
    if let Err(e) = seg.file.set_len(seg.len).and_then(|()| seg.file.sync_all()) {
        tracing::error!(
            file = %seg.path.display(),
            error = %e,
            "cannot cut a failed batch off the log"
        );
    }
}

impl Store for LogStore {
    fn recover(&self) -> Result<Vec<StoredRecord>, Error> {
        Ok(self.recovered.lock().take().unwrap_or_default())
    }

    fn put(&self, record: RecordRef<'_>) -> Result<u64, Error> {
        self.append(PUT, |out| record.encode(out))
    }

    fn remove(&self, id: FamilyId, _expected_lsn: u64) -> Result<u64, Error> {
        self.append(REMOVE, |out| out.extend_from_slice(id.as_bytes()))
    }

    fn wait_durable(&self, lsn: u64) -> Result<(), Error> {
        let s = &self.shared;
        if s.durable.load(Ordering::Acquire) >= lsn {
            return Ok(());
        }
        {
            let mut w = s.waiters.lock();
            if w.failed {
                return Err(s.failure_error());
            }
            w.list.push((lsn, Waiter::Thread(std::thread::current())));
        }
        loop {
            // Registered before this check, so a publish after it unparks us.
            if s.durable.load(Ordering::Acquire) >= lsn {
                return Ok(());
            }
            if s.failed.load(Ordering::Acquire) {
                return Err(s.failure_error());
            }
            std::thread::park();
        }
    }

    fn poll_durable(&self, lsn: u64, waker: &Waker) -> Poll<Result<(), Error>> {
        let s = &self.shared;
        if s.durable.load(Ordering::Acquire) >= lsn {
            return Poll::Ready(Ok(()));
        }
        {
            let mut w = s.waiters.lock();
            if w.failed {
                return Poll::Ready(Err(s.failure_error()));
            }
            w.list.push((lsn, Waiter::Task(waker.clone())));
        }
        // Re-check: the writer may have published between the load and the push.
        if s.durable.load(Ordering::Acquire) >= lsn {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }

    fn durability(&self) -> Durability {
        self.shared.durability
    }

    fn failure(&self) -> Option<Error> {
        self.check().err()
    }

    fn compact(&self, snapshot: &mut Snapshot<'_>) -> Result<(), Error> {
        let s = &self.shared;
        let _one = s.compacting.lock();
        self.check()?;
        // 1. The writer starts a new segment; every record before it is
        //    written and synced in older segments, which the snapshot will
        //    replace.
        let boundary = self.rotate()?;
        // 2. Dump every family with its LSN. The table may already be
        //    newer than `boundary`; recovery applies what is newest.
        let tmp = s.dir.join(seq_name("snapshot", boundary, "tmp"));
        let written = write_snapshot(&tmp, snapshot, s.hooks.as_deref());
        if let Err(e) = written {
            // Nothing durable depends on the partial file; recovery would
            // remove it too.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let fin = s.dir.join(seq_name("snapshot", boundary, "rgs"));
        fs::rename(&tmp, &fin).map_err(|e| io_err(&fin, e))?;
        // Older files go only once the snapshot's name is durable.
        sync_dir(&s.dir)?;
        // 3. Older segments and snapshots are now redundant.
        for entry in fs::read_dir(&s.dir).map_err(|e| io_err(&s.dir, e))? {
            let name = entry.map_err(|e| io_err(&s.dir, e))?.file_name();
            let name = name.to_string_lossy();
            let old = parse_seq(&name, "log", "rgl").is_some_and(|l| l < boundary)
                || parse_seq(&name, "snapshot", "rgs").is_some_and(|l| l < boundary);
            if old {
                let p = s.dir.join(&*name);
                fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        let last = {
            let mut p = self.shared.pending.lock();
            // Only if something waits to be written: otherwise the flag would
            // cut the next batch's interval short for nothing.
            if !p.buf.is_empty() {
                p.flush = true;
            }
            p.next_lsn - 1
        };
        self.shared.work.notify_one();
        self.shared.urgent.notify_one();
        self.wait_durable(last)
    }
}

/// Write the snapshot to `tmp` (0600) and sync it.
fn write_snapshot(
    tmp: &Path,
    snapshot: &mut Snapshot<'_>,
    hooks: Option<&dyn LogHooks>,
) -> Result<(), Error> {
    let mut out = Vec::with_capacity(1 << 20);
    let mut file = private::file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(|e| io_err(tmp, e))?;
    let mut write_err = None;
    snapshot(&mut |r: RecordRef<'_>| {
        frame(&mut out, PUT, r.lsn(), |o| r.encode(o));
        if out.len() >= 1 << 20 && write_err.is_none() {
            if let Err(e) = write_file(hooks, tmp, &mut file, &out) {
                write_err = Some(e);
            }
            out.clear();
        }
    });
    if let Some(e) = write_err {
        return Err(io_err(tmp, e));
    }
    write_file(hooks, tmp, &mut file, &out)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err(tmp, e))
}

impl Drop for LogStore {
    fn drop(&mut self) {
        self.shared.pending.lock().shutdown = true;
        self.shared.work.notify_all();
        self.shared.urgent.notify_all();
        // The writer writes and syncs what is pending before it returns.
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
    }
}
