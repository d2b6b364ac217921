//! The embedded store: an append-only log of CRC-checked records with
//! snapshot compaction, in one local directory.
//!
//! Files: `log-<first lsn>.rgl` segments and `snapshot-<lsn>.rgs`
//! snapshots, both sequences of records
//! `[len u32][crc32 u32][kind u8][lsn u64][payload]` (little-endian;
//! `len` counts kind, lsn and payload; the CRC covers the same bytes).
//! Recovery replays the newest snapshot, then every segment, applying a
//! record only if its LSN is newer than what it replaces, so a snapshot
//! taken while writes continue is still exact.
//!
//! One writer thread owns the file: appenders copy their record into a
//! shared buffer and return; the writer takes the whole buffer, writes it,
//! fsyncs and publishes the durable LSN. Everyone who appended while the
//! previous fsync ran shares the next one. In `Batched(interval)` mode the
//! writer first lets records gather for up to `interval` from the first of
//! them (appenders do not wait for durability there), so a crash loses at
//! most the last interval's changes; `flush` and shutdown cut it short.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
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

const PUT: u8 = 1;
const REMOVE: u8 = 2;
const HEADER: usize = 8;
/// No family record comes near this; a longer length field is corruption,
/// not a torn write.
const MAX_RECORD: usize = 64 * 1024;

/// How the embedded store opens.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// When a change counts as done; `Durability::None` is refused (use no
    /// store at all).
    pub durability: Durability,
    /// Start even if a file is corrupt in the middle, dropping everything
    /// from the corrupt record on (and logging what was dropped).
    pub repair: bool,
}

impl Default for LogOptions {
    fn default() -> LogOptions {
        LogOptions {
            durability: Durability::Sync,
            repair: false,
        }
    }
}

struct Pending {
    buf: Vec<u8>,
    spare: Vec<u8>,
    next_lsn: u64,
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
    /// Cuts a batched writer's interval short: `flush` and shutdown.
    urgent: Condvar,
    durable: AtomicU64,
    /// Who waits for which LSN: woken one by one when it is durable, so a
    /// batch wakes exactly the callers it completes.
    waiters: Mutex<Vec<(u64, Waiter)>>,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// The open segment; the writer and compaction take turns.
    file: Mutex<Segment>,
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

struct Segment {
    file: File,
    path: PathBuf,
    bytes: u64,
}

/// The embedded, durable store. See the module docs for the format.
pub struct LogStore {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    recovered: Mutex<Option<Vec<StoredRecord>>>,
}

fn io_err(path: &Path, e: io::Error) -> Error {
    Error::Store {
        detail: format!("{}: {e}", path.display()),
    }
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

/// Replay state: per family the newest record seen, or a tombstone.
type Replay = HashMap<FamilyId, (u64, Option<crate::family::Family>), ahash::RandomState>;

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

impl LogStore {
    /// Open (creating if needed) the store in `dir` and recover its state.
    /// The directory is created 0700 and its files 0600; a directory other
    /// users can reach, or that another user owns, is refused
    /// ([`Error::Exposed`]; docs/store.md, "Permissions"). A torn last
    /// record is dropped with a log line; a corrupt record elsewhere
    /// refuses to open, naming file and offset, unless `options.repair`.
    pub fn open(dir: impl AsRef<Path>, options: LogOptions) -> Result<LogStore, Error> {
        let dir = dir.as_ref().to_path_buf();
        if options.durability == Durability::None {
            return Err(Error::InvalidArgument {
                name: "durability",
                expected: "sync or batched for a store (none means no store)",
            });
        }
        private::create_dir(&dir)?;
        let (records, max_lsn) = recover_dir(&dir, options.repair)?;
        let next_lsn = max_lsn + 1;
        let path = dir.join(seq_name("log", next_lsn, "rgl"));
        let file = private::file_options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        sync_dir(&dir)?;
        let shared = Arc::new(Shared {
            dir,
            durability: options.durability,
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(1 << 16),
                spare: Vec::with_capacity(1 << 16),
                next_lsn,
                shutdown: false,
                flush: false,
            }),
            work: Condvar::new(),
            urgent: Condvar::new(),
            durable: AtomicU64::new(max_lsn),
            waiters: Mutex::new(Vec::with_capacity(256)),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            file: Mutex::new(Segment {
                file,
                path,
                bytes: 0,
            }),
        });
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("refresh-guard-log".into())
            .spawn(move || writer_loop(&writer_shared))
            .map_err(|e| Error::Store {
                detail: format!("cannot start log writer: {e}"),
            })?;
        Ok(LogStore {
            shared,
            writer: Mutex::new(Some(writer)),
            recovered: Mutex::new(Some(records)),
        })
    }

    /// Bytes in the open log segment (for deciding when to compact).
    pub fn segment_bytes(&self) -> u64 {
        self.shared.file.lock().bytes
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
}

impl Shared {
    fn failure_error(&self) -> Error {
        Error::Store {
            detail: self
                .failure
                .lock()
                .clone()
                .unwrap_or_else(|| "store failed".into()),
        }
    }

    fn fail(&self, detail: String) {
        tracing::error!(%detail, "store failed; refusing all changes until restart");
        *self.failure.lock() = Some(detail);
        self.failed.store(true, Ordering::Release);
        for (_, w) in self.waiters.lock().drain(..) {
            w.wake();
        }
    }

    fn publish(&self, lsn: u64) {
        // fetch_max: compaction may publish ahead of the writer.
        self.durable.fetch_max(lsn, Ordering::AcqRel);
        let mut waiters = self.waiters.lock();
        let mut i = 0;
        while i < waiters.len() {
            if waiters[i].0 <= lsn {
                waiters.swap_remove(i).1.wake();
            } else {
                i += 1;
            }
        }
    }
}

fn writer_loop(s: &Shared) {
    loop {
        let (mut batch, last) = {
            let mut p = s.pending.lock();
            while p.buf.is_empty() && !p.shutdown {
                s.work.wait(&mut p);
            }
            if let Durability::Batched(interval) = s.durability {
                // Let changes accumulate for one interval from the first of
                // them, so none waits longer than that to be durable; a
                // flush or shutdown ends the wait early.
                let deadline = Instant::now() + interval;
                while !p.shutdown && !p.flush {
                    if s.urgent.wait_until(&mut p, deadline).timed_out() {
                        break;
                    }
                }
            }
            p.flush = false;
            if p.buf.is_empty() && p.shutdown {
                return;
            }
            let spare = std::mem::take(&mut p.spare);
            let batch = std::mem::replace(&mut p.buf, spare);
            (batch, p.next_lsn - 1)
        };
        let result = {
            let mut seg = s.file.lock();
            let r = seg
                .file
                .write_all(&batch)
                .and_then(|()| seg.file.sync_data());
            seg.bytes += batch.len() as u64;
            r.map_err(|e| format!("{}: {e}", seg.path.display()))
        };
        if let Err(detail) = result {
            s.fail(detail);
            return;
        }
        batch.clear();
        s.pending.lock().spare = batch;
        s.publish(last);
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
        s.waiters
            .lock()
            .push((lsn, Waiter::Thread(std::thread::current())));
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
        if s.failed.load(Ordering::Acquire) {
            return Poll::Ready(Err(s.failure_error()));
        }
        s.waiters.lock().push((lsn, Waiter::Task(waker.clone())));
        // Re-check: the writer may have published between the load and the push.
        if s.durable.load(Ordering::Acquire) >= lsn {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }

    fn durability(&self) -> Durability {
        self.shared.durability
    }

    fn compact(&self, snapshot: &mut Snapshot<'_>) -> Result<(), Error> {
        self.check()?;
        let s = &self.shared;
        // 1. Start a new segment at the next LSN; everything before it is in
        //    older segments, which the snapshot will replace.
        let boundary = {
            // Appenders wait here for the switch (rare, one fsync long).
            let mut p = s.pending.lock();
            let mut seg = s.file.lock();
            let boundary = p.next_lsn;
            // Pending records belong to the old segment: write them here
            // rather than leave them to the writer.
            let pending = std::mem::take(&mut p.buf);
            seg.file
                .write_all(&pending)
                .and_then(|()| seg.file.sync_data())
                .map_err(|e| io_err(&seg.path, e))?;
            p.buf = pending;
            p.buf.clear();
            let path = s.dir.join(seq_name("log", boundary, "rgl"));
            let file = private::file_options()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            *seg = Segment {
                file,
                path,
                bytes: 0,
            };
            boundary
        };
        s.publish(boundary - 1);
        sync_dir(&s.dir)?;
        // 2. Dump every family with its LSN.
        let tmp = s.dir.join(seq_name("snapshot", boundary, "tmp"));
        let mut out = Vec::with_capacity(1 << 20);
        let mut file = private::file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        let mut write_err = None;
        snapshot(&mut |r: RecordRef<'_>| {
            frame(&mut out, PUT, r.lsn(), |o| r.encode(o));
            if out.len() >= 1 << 20 && write_err.is_none() {
                if let Err(e) = file.write_all(&out) {
                    write_err = Some(e);
                }
                out.clear();
            }
        });
        if let Some(e) = write_err {
            return Err(io_err(&tmp, e));
        }
        file.write_all(&out)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err(&tmp, e))?;
        let fin = s.dir.join(seq_name("snapshot", boundary, "rgs"));
        fs::rename(&tmp, &fin).map_err(|e| io_err(&fin, e))?;
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

impl Drop for LogStore {
    fn drop(&mut self) {
        self.shared.pending.lock().shutdown = true;
        self.shared.work.notify_all();
        self.shared.urgent.notify_all();
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
        let _ = self.shared.file.lock().file.sync_data();
    }
}

/// Read every snapshot and segment in `dir`; return the live families and
/// the highest LSN seen.
fn recover_dir(dir: &Path, repair: bool) -> Result<(Vec<StoredRecord>, u64), Error> {
    let mut snapshots = Vec::new();
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let name = entry.map_err(|e| io_err(dir, e))?.file_name();
        let name = name.to_string_lossy().into_owned();
        if let Some(l) = parse_seq(&name, "snapshot", "rgs") {
            snapshots.push((l, name));
        } else if let Some(l) = parse_seq(&name, "log", "rgl") {
            segments.push((l, name));
        } else if name.ends_with(".tmp") {
            // An interrupted compaction: the segments it would replace are
            // all still there.
            let p = dir.join(&name);
            fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
        }
    }
    snapshots.sort();
    segments.sort();
    let mut replay: Replay = HashMap::default();
    let mut max_lsn = 0;
    if let Some((_, name)) = snapshots.last() {
        read_file(&dir.join(name), false, repair, &mut replay, &mut max_lsn)?;
    }
    let n = segments.len();
    for (i, (_, name)) in segments.iter().enumerate() {
        read_file(
            &dir.join(name),
            i + 1 == n,
            repair,
            &mut replay,
            &mut max_lsn,
        )?;
    }
    let records = replay
        .into_values()
        .filter_map(|(lsn, f)| {
            f.map(|mut family| {
                family.lsn = lsn;
                StoredRecord { family }
            })
        })
        .collect();
    Ok((records, max_lsn))
}

fn read_file(
    path: &Path,
    last: bool,
    repair: bool,
    replay: &mut Replay,
    max_lsn: &mut u64,
) -> Result<(), Error> {
    private::tighten_file(path)?;
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| io_err(path, e))?;
    let mut off = 0usize;
    while off < bytes.len() {
        match next_record(&bytes, off) {
            Ok((kind, lsn, payload, end)) => {
                apply(kind, lsn, payload, replay).ok_or_else(|| Error::Corrupt {
                    file: path.to_path_buf(),
                    offset: off as u64,
                    detail: "record does not decode".into(),
                })?;
                *max_lsn = (*max_lsn).max(lsn);
                off = end;
            }
            Err(torn) => {
                let dropped = bytes.len() - off;
                if torn && last {
                    tracing::warn!(
                        file = %path.display(),
                        offset = off,
                        bytes = dropped,
                        "dropping a torn last record: a write interrupted by a crash"
                    );
                } else if repair {
                    tracing::warn!(
                        file = %path.display(),
                        offset = off,
                        bytes = dropped,
                        "repair: dropping everything from a corrupt record"
                    );
                } else {
                    return Err(Error::Corrupt {
                        file: path.to_path_buf(),
                        offset: off as u64,
                        detail: "checksum mismatch or bad length; start with repair to drop the rest of this file".into(),
                    });
                }
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| io_err(path, e))?;
                f.set_len(off as u64)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| io_err(path, e))?;
                break;
            }
        }
    }
    Ok(())
}

/// The record at `off`: (kind, lsn, payload, end offset), or whether the
/// failure looks like a torn tail (`true`) rather than corruption.
fn next_record(b: &[u8], off: usize) -> Result<(u8, u64, &[u8], usize), bool> {
    let rest = &b[off..];
    if rest.len() < HEADER {
        return Err(true);
    }
    let len = u32::from_le_bytes(rest[..4].try_into().map_err(|_| true)?) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().map_err(|_| true)?);
    if !(9..=MAX_RECORD).contains(&len) {
        return Err(false);
    }
    if rest.len() < HEADER + len {
        return Err(true);
    }
    let body = &rest[HEADER..HEADER + len];
    if crc32fast::hash(body) != crc {
        // A bad checksum on the very last record is a torn write.
        return Err(HEADER + len == rest.len());
    }
    let lsn = u64::from_le_bytes(body[1..9].try_into().map_err(|_| false)?);
    Ok((body[0], lsn, &body[9..], off + HEADER + len))
}

fn apply(kind: u8, lsn: u64, payload: &[u8], replay: &mut Replay) -> Option<()> {
    let (id, state) = match kind {
        PUT => {
            let f = crate::store::codec::decode(payload)?;
            (f.id, Some(f))
        }
        REMOVE => (FamilyId::from_bytes(payload.try_into().ok()?), None),
        _ => return None,
    };
    match replay.get(&id) {
        Some((seen, _)) if *seen >= lsn => {}
        _ => {
            replay.insert(id, (lsn, state));
        }
    }
    Some(())
}
