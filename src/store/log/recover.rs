//! Reading the log back: records, the torn-tail rule, replay.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use super::{HEADER, MAX_RECORD, PUT, REMOVE, io_err, parse_seq};
use crate::error::Error;
use crate::family::Family;
use crate::store::{StoredRecord, codec, private};
use crate::token::FamilyId;

/// Why the record at an offset could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Bad {
    /// The file ends inside the record: its header, or the bytes its
    /// length announces.
    CutShort,
    /// The length field is one no record can have.
    Length,
    /// The checksum does not match.
    Checksum,
    /// The checksum matches but the record does not decode.
    Decode,
    /// The checksum matches but the LSN is one no writer assigns.
    Lsn,
}

/// The highest LSN a record may carry. Writers count up from 1 and never
/// get near 2^63 (a billion writes a second for 292 years); refusing more
/// keeps `max + 1`, the next LSN after recovery, from overflowing (docs/store.md,
/// "Files and records").
pub(super) const MAX_LSN: u64 = i64::MAX as u64;

impl Bad {
    pub(super) fn what(self) -> &'static str {
        match self {
            Bad::CutShort => "the file ends inside a record",
            Bad::Length => "impossible record length",
            Bad::Checksum => "checksum mismatch",
            Bad::Decode => "a record that does not decode (written by a newer version?)",
            Bad::Lsn => "a record with an LSN no writer assigns (0, or 2^63 and above)",
        }
    }
}

/// One framed record.
pub(super) struct Record<'a> {
    pub(super) kind: u8,
    pub(super) lsn: u64,
    pub(super) payload: &'a [u8],
}

/// The record at `off` and the offset after it.
pub(super) fn next_record(b: &[u8], off: usize) -> Result<(Record<'_>, usize), Bad> {
    let rest = &b[off..];
    let Some((head, after)) = rest.split_first_chunk::<HEADER>() else {
        return Err(Bad::CutShort);
    };
    let [l0, l1, l2, l3, c0, c1, c2, c3] = *head;
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    if !(9..=MAX_RECORD).contains(&len) {
        return Err(Bad::Length);
    }
    let Some(body) = after.get(..len) else {
        return Err(Bad::CutShort);
    };
    if crc32fast::hash(body) != crc {
        return Err(Bad::Checksum);
    }
    let (kind, body) = body.split_first().ok_or(Bad::Length)?;
    let (lsn, payload) = body.split_first_chunk::<8>().ok_or(Bad::Length)?;
    Ok((
        Record {
            kind: *kind,
            lsn: u64::from_le_bytes(*lsn),
            payload,
        },
        off + HEADER + len,
    ))
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Whether the bytes from the bad record at `off` to the end of the last
/// segment are a torn tail: an append a crash or power loss interrupted,
/// which nobody was told is durable (docs/store.md, "Torn tails"). That is
/// a record the end of the file cuts short; one whose checksum fails with
/// nothing but zeros after it; or, from an impossible length on, nothing
/// but zeros (the file was extended, the data never landed).
pub(super) fn is_torn(b: &[u8], off: usize, bad: Bad) -> bool {
    let rest = &b[off..];
    match bad {
        // The checksum does not cover the length field: a flipped length
        // that points past the end looks cut short while whole records
        // follow it. An interrupted append leaves no whole record behind
        // its start, so one found there means corruption, not a tear.
        Bad::CutShort => !record_starts_after(b, off),
        Bad::Length => all_zero(rest),
        Bad::Checksum => {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            all_zero(&rest[HEADER + len..])
        }
        Bad::Decode | Bad::Lsn => false,
    }
}

/// Whether a whole, decodable record starts anywhere after `off`.
fn record_starts_after(b: &[u8], off: usize) -> bool {
    (off + 1..b.len()).any(|at| {
        next_record(b, at)
            .ok()
            .is_some_and(|(r, _)| decode(&r).is_some())
    })
}

/// What a record does: the family it is about and its new state (`None`:
/// removed). `None` if it does not decode.
pub(super) fn decode(r: &Record<'_>) -> Option<(FamilyId, Option<Family>)> {
    match r.kind {
        PUT => {
            let f = codec::decode(r.payload)?;
            Some((f.id, Some(f)))
        }
        REMOVE => Some((FamilyId::from_bytes(r.payload.try_into().ok()?), None)),
        _ => None,
    }
}

/// Replay state: per family the newest record seen, or a tombstone.
pub(super) type Replay = HashMap<FamilyId, (u64, Option<Family>), ahash::RandomState>;

/// Keep `state` for `id` if `lsn` is newer than what is kept.
pub(super) fn apply(replay: &mut Replay, lsn: u64, id: FamilyId, state: Option<Family>) {
    match replay.get(&id) {
        Some((seen, _)) if *seen >= lsn => {}
        _ => {
            replay.insert(id, (lsn, state));
        }
    }
}

/// Feed every record of `bytes` to `each`, in order; the offset of the
/// first one that cannot be read, and why, if any.
pub(super) fn read_records(
    bytes: &[u8],
    mut each: impl FnMut(u64, FamilyId, Option<Family>),
) -> Option<(usize, Bad)> {
    let mut off = 0;
    while off < bytes.len() {
        match next_record(bytes, off) {
            Ok((r, _)) if !(1..=MAX_LSN).contains(&r.lsn) => return Some((off, Bad::Lsn)),
            Ok((r, end)) => match decode(&r) {
                Some((id, state)) => {
                    each(r.lsn, id, state);
                    off = end;
                }
                None => return Some((off, Bad::Decode)),
            },
            Err(bad) => return Some((off, bad)),
        }
    }
    None
}

/// The files of a store directory.
pub(super) struct Files {
    /// The newest snapshot (older ones are leftovers of an interrupted
    /// compaction's clean-up).
    pub(super) snapshot: Option<PathBuf>,
    /// Segments, oldest first.
    pub(super) segments: Vec<PathBuf>,
    /// Snapshots an interrupted compaction left half written.
    pub(super) partial: Vec<PathBuf>,
    /// Complete snapshots older than `snapshot`: superseded, never read.
    pub(super) stale: Vec<PathBuf>,
}

impl Files {
    /// Every file recovery reads, in order, each with whether it is the
    /// last segment (the only file an interrupted append can end).
    pub(super) fn in_order(&self) -> impl Iterator<Item = (&Path, bool)> {
        let n = self.segments.len();
        self.snapshot.iter().map(|p| (p.as_path(), false)).chain(
            self.segments
                .iter()
                .enumerate()
                .map(move |(i, p)| (p.as_path(), i + 1 == n)),
        )
    }
}

pub(super) fn list(dir: &Path) -> Result<Files, Error> {
    let mut snapshots = Vec::new();
    let mut segments = Vec::new();
    let mut partial = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let name = entry.map_err(|e| io_err(dir, e))?.file_name();
        let name = name.to_string_lossy().into_owned();
        if let Some(l) = parse_seq(&name, "snapshot", "rgs") {
            snapshots.push((l, name));
        } else if let Some(l) = parse_seq(&name, "log", "rgl") {
            segments.push((l, name));
        } else if parse_seq(&name, "snapshot", "tmp").is_some() {
            partial.push(dir.join(name));
        }
    }
    snapshots.sort();
    segments.sort();
    let snapshot = snapshots.pop().map(|(_, n)| dir.join(n));
    Ok(Files {
        snapshot,
        segments: segments.into_iter().map(|(_, n)| dir.join(n)).collect(),
        partial,
        stale: snapshots.into_iter().map(|(_, n)| dir.join(n)).collect(),
    })
}

/// Read every snapshot and segment in `dir`; return the live families and
/// the highest LSN seen.
pub(super) fn recover_dir(dir: &Path) -> Result<(Vec<StoredRecord>, u64), Error> {
    let files = list(dir)?;
    for p in &files.partial {
        // An interrupted compaction: the segments it would replace are all
        // still there.
        fs::remove_file(p).map_err(|e| io_err(p, e))?;
    }
    for p in &files.stale {
        // Never read, but they hold families' secrets like the rest: the
        // same rule for every file the store owns (docs/store.md).
        private::tighten_file(p)?;
    }
    let mut replay = Replay::default();
    let mut max_lsn = 0;
    for (path, last) in files.in_order() {
        private::tighten_file(path)?;
        let bytes = fs::read(path).map_err(|e| io_err(path, e))?;
        let bad = read_records(&bytes, |lsn, id, state| {
            apply(&mut replay, lsn, id, state);
            max_lsn = max_lsn.max(lsn);
        });
        if last {
            // What a killed process wrote may still be only in the page
            // cache. Recovery is about to treat it as durable and start a
            // new segment after it, so it must reach the disk first: a
            // power loss could otherwise tear a segment that is no longer
            // the last, which no start would accept (docs/store.md).
            sync_file(path)?;
        }
        let Some((off, bad)) = bad else { continue };
        if !(last && is_torn(&bytes, off, bad)) {
            return Err(Error::Corrupt {
                file: path.to_owned(),
                offset: off as u64,
                detail: refusal(dir, bad, last),
            });
        }
        tracing::warn!(
            file = %path.display(),
            offset = off,
            bytes = bytes.len() - off,
            zero_filled = all_zero(&bytes[off..]),
            "dropping a torn last record: an append cut short by a crash or power loss, \
             never acknowledged"
        );
        truncate(path, off as u64)?;
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

/// Why an unreadable record is corruption and not a torn tail, and what
/// to do.
fn refusal(dir: &Path, bad: Bad, last: bool) -> String {
    let why = match (bad, last) {
        (Bad::Decode | Bad::Lsn, _) => "",
        (_, false) => ", in a file newer files follow (so not an interrupted append)",
        (_, true) => ", with data after it (so not an interrupted append)",
    };
    format!(
        "{}{why}; stop the server and run `refresh-guard store repair {}`: it saves the \
         bytes it drops aside and lists the families whose latest state they held",
        bad.what(),
        dir.display()
    )
}

/// Cut `path` to `len` bytes, durably.
fn sync_file(path: &Path) -> Result<(), Error> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(path, e))
}

pub(super) fn truncate(path: &Path, len: u64) -> Result<(), Error> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.set_len(len)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err(path, e))
}
