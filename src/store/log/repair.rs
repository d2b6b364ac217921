//! `LogStore::repair`: the one-shot answer to a store that refuses to open
//! (docs/store.md, "Repair"). It drops every file's bytes from its first
//! unreadable record on, after saving them aside, and names the families
//! whose latest state was in them.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::recover::{self, Bad, Replay};
use super::{LOG_SUBDIR, LogStore, io_err, parse_seq, sync_dir};
use crate::error::Error;
use crate::store::private;
use crate::token::FamilyId;

/// What [`LogStore::repair`] did.
#[derive(Clone, Debug)]
pub struct RepairReport {
    /// The store directory repaired.
    pub dir: PathBuf,
    /// Every range of bytes dropped, one per file at most, in recovery
    /// order. Empty: nothing was wrong and nothing changed.
    pub dropped: Vec<Dropped>,
    /// Families that survive in an older state than the newest one the
    /// dropped bytes held: a token they had already spent (rotated out or
    /// revoked) may be redeemable again.
    pub rolled_back: Vec<RolledBack>,
    /// Families with no record left: their tokens are now refused as
    /// unknown.
    pub forgotten: Vec<FamilyId>,
}

/// One file's dropped bytes.
#[derive(Clone, Debug)]
pub struct Dropped {
    /// The file, now cut at `offset`.
    pub file: PathBuf,
    /// Where its first unreadable record was.
    pub offset: u64,
    /// How many bytes were dropped (from `offset` to the old end).
    pub bytes: u64,
    /// Where they were saved.
    pub saved_to: PathBuf,
    /// Why the record at `offset` could not be read.
    pub reason: &'static str,
    /// Whether it was a torn tail (an interrupted append, never
    /// acknowledged; opening the store drops those by itself).
    pub torn: bool,
    /// Records in the dropped bytes that could still be read.
    pub readable_records: usize,
    /// Dropped bytes that could not be read as records: a family written
    /// only there cannot be named.
    pub unreadable_bytes: u64,
}

/// A family that survives in an older state, with whom to revoke it by.
#[derive(Clone, Debug)]
pub struct RolledBack {
    /// Its id.
    pub id: FamilyId,
    /// Its client.
    pub client: String,
    /// Its subject.
    pub subject: String,
}

/// One file's repair, found before anything changes.
struct Plan {
    file: PathBuf,
    offset: usize,
    len: usize,
    bad: Bad,
    torn: bool,
    /// Readable records after the bad one: (lsn, family).
    salvaged: Vec<(u64, FamilyId)>,
    readable_bytes: usize,
}

impl LogStore {
    /// Make a store that refuses to open ([`Error::Corrupt`]) open again:
    /// the one-shot repair behind `refresh-guard store repair DIR`. Stop
    /// every process using the store first.
    ///
    /// `dir` is the store's directory, or a directory holding it as `log/`
    /// (the server's data directory); it is refused if it is neither, or
    /// both. For each file (the newest snapshot, then every segment) whose
    /// records stop being readable, the bytes from the first unreadable
    /// record to the end are saved aside under `dir/dropped/` (0600), then
    /// the file is cut there. Nothing changes until every file is read and
    /// every dropped range saved.
    ///
    /// The report lists the families whose latest state was in readable
    /// records among the dropped bytes: those that survive in an older
    /// state ([`RepairReport::rolled_back`]: their spent tokens may be
    /// redeemable again, so revoke them) and those with no record left.
    /// Families written only in unreadable bytes cannot be named.
    pub fn repair(dir: impl AsRef<Path>) -> Result<RepairReport, Error> {
        let dir = store_dir(dir.as_ref())?;
        private::check_dir(&dir)?;
        // Held until the repair is done: no live writer may append behind it.
        let _lock = super::lock_dir(&dir)?;
        let files = recover::list(&dir)?;
        let mut replay = Replay::default();
        let mut plans = Vec::new();
        for (path, last) in files.in_order() {
            private::tighten_file(path)?;
            let bytes = fs::read(path).map_err(|e| io_err(path, e))?;
            let bad = recover::read_records(&bytes, |lsn, id, state| {
                recover::apply(&mut replay, lsn, id, state);
            });
            if let Some((offset, bad)) = bad {
                let (salvaged, readable_bytes) = salvage(&bytes, offset);
                plans.push(Plan {
                    file: path.to_owned(),
                    offset,
                    len: bytes.len(),
                    bad,
                    torn: last && recover::is_torn(&bytes, offset, bad),
                    salvaged,
                    readable_bytes,
                });
            }
        }
        let mut report = RepairReport {
            dir: dir.clone(),
            dropped: Vec::new(),
            rolled_back: Vec::new(),
            forgotten: Vec::new(),
        };
        if plans.is_empty() {
            return Ok(report);
        }
        let saved = save_aside(&dir, &plans)?;
        for p in &plans {
            recover::truncate(&p.file, p.offset as u64)?;
        }
        sync_dir(&dir)?;
        for (p, saved_to) in plans.iter().zip(saved) {
            report.dropped.push(Dropped {
                file: p.file.clone(),
                offset: p.offset as u64,
                bytes: (p.len - p.offset) as u64,
                saved_to,
                reason: p.bad.what(),
                torn: p.torn,
                readable_records: p.salvaged.len(),
                unreadable_bytes: (p.len - p.offset - p.readable_bytes) as u64,
            });
        }
        (report.rolled_back, report.forgotten) = lost(&plans, &replay);
        Ok(report)
    }
}

/// The store directory `dir` names: itself, or the server's `dir/log`.
fn store_dir(dir: &Path) -> Result<PathBuf, Error> {
    let holds_store = |d: &Path| -> Result<bool, Error> {
        for entry in fs::read_dir(d).map_err(|e| io_err(d, e))? {
            let name = entry.map_err(|e| io_err(d, e))?.file_name();
            let name = name.to_string_lossy();
            if parse_seq(&name, "log", "rgl").is_some()
                || parse_seq(&name, "snapshot", "rgs").is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    };
    let sub = dir.join(LOG_SUBDIR);
    let nested = sub.is_dir() && holds_store(&sub)?;
    match (holds_store(dir)?, nested) {
        (true, false) => Ok(dir.to_owned()),
        (false, true) => Ok(sub),
        (true, true) => Err(Error::store(format!(
            "{} holds store files and so does {}: name the one to repair",
            dir.display(),
            sub.display()
        ))),
        (false, false) => Err(Error::store(format!(
            "{}: no store here: expected log-*.rgl or snapshot-*.rgs files in it \
                 (a store directory) or in {} (a server data directory)",
            dir.display(),
            sub.display()
        ))),
    }
}

/// The readable records after the unreadable one at `offset`, found by
/// trying every later offset (a checksum and a full decode must match), and
/// how many bytes they cover.
fn salvage(bytes: &[u8], offset: usize) -> (Vec<(u64, FamilyId)>, usize) {
    let mut found = Vec::new();
    let mut covered = 0;
    let mut at = offset + 1;
    while at < bytes.len() {
        let read = recover::next_record(bytes, at)
            .ok()
            .and_then(|(r, end)| Some((r.lsn, recover::decode(&r)?.0, end)));
        match read {
            Some((lsn, id, end)) => {
                found.push((lsn, id));
                covered += end - at;
                at = end;
            }
            None => at += 1,
        }
    }
    (found, covered)
}

/// Copy each plan's dropped bytes to `dir/dropped/`, synced; on any error
/// remove what this call saved, so a failed repair changes nothing.
fn save_aside(dir: &Path, plans: &[Plan]) -> Result<Vec<PathBuf>, Error> {
    let aside = dir.join("dropped");
    private::create_dir(&aside)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut saved = Vec::with_capacity(plans.len());
    for p in plans {
        let name = p
            .file
            .file_name()
            .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
        let to = aside.join(format!("{name}.from-{}.{stamp}", p.offset));
        if let Err(e) = copy_tail(&p.file, p.offset as u64, &to) {
            for s in &saved {
                let _ = fs::remove_file(s);
            }
            return Err(e);
        }
        saved.push(to);
    }
    sync_dir(&aside)?;
    Ok(saved)
}

/// Copy `from`'s bytes after `offset` to the new file `to`, synced; on
/// failure `to` is removed (or was never created).
fn copy_tail(from: &Path, offset: u64, to: &Path) -> Result<(), Error> {
    let mut src = File::open(from).map_err(|e| io_err(from, e))?;
    src.seek(SeekFrom::Start(offset))
        .map_err(|e| io_err(from, e))?;
    let mut dst = private::file_options()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| io_err(to, e))?;
    io::copy(&mut src, &mut dst)
        .and_then(|_| dst.sync_all())
        .map_err(|e| {
            let _ = fs::remove_file(to);
            io_err(to, e)
        })
}

/// The families whose newest readable record was dropped, against what
/// survives. Torn tails are left out: they were never acknowledged, so no
/// client holds what they recorded.
fn lost(plans: &[Plan], kept: &Replay) -> (Vec<RolledBack>, Vec<FamilyId>) {
    let mut newest: BTreeMap<FamilyId, u64> = BTreeMap::new();
    for p in plans.iter().filter(|p| !p.torn) {
        for &(lsn, id) in &p.salvaged {
            let e = newest.entry(id).or_insert(lsn);
            *e = (*e).max(lsn);
        }
    }
    let mut rolled_back = Vec::new();
    let mut forgotten = Vec::new();
    for (id, lsn) in newest {
        match kept.get(&id) {
            Some((at, _)) if *at >= lsn => {}
            Some((_, Some(f))) => rolled_back.push(RolledBack {
                id,
                client: f.client().to_string(),
                subject: f.subject.as_str().to_owned(),
            }),
            _ => forgotten.push(id),
        }
    }
    (rolled_back, forgotten)
}

fn count(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dropped.is_empty() {
            return writeln!(
                f,
                "{}: every record reads; nothing to repair, nothing changed",
                self.dir.display()
            );
        }
        writeln!(f, "repaired {}:", self.dir.display())?;
        for d in &self.dropped {
            let name = d.file.file_name().unwrap_or(d.file.as_os_str());
            writeln!(
                f,
                "  {}: dropped {} from offset {} ({}{}), saved to {}; {} in them could \
                 be read, {} could not",
                name.to_string_lossy(),
                count(d.bytes, "byte"),
                d.offset,
                d.reason,
                if d.torn { ", a torn tail" } else { "" },
                d.saved_to.display(),
                count(d.readable_records as u64, "record"),
                count(d.unreadable_bytes, "byte")
            )?;
        }
        if !self.rolled_back.is_empty() {
            writeln!(
                f,
                "families that lost their latest state and survive in an older one ({}): \
                 a token they had already spent (rotated out or revoked) may be redeemable \
                 again; revoke them (e.g. POST /admin/v1/subjects/SUBJECT/revoke):",
                self.rolled_back.len()
            )?;
            for r in &self.rolled_back {
                writeln!(
                    f,
                    "  family {}  client {:?}  subject {:?}",
                    r.id, r.client, r.subject
                )?;
            }
        }
        if !self.forgotten.is_empty() {
            writeln!(
                f,
                "families with no record left ({}): their tokens are refused as unknown:",
                self.forgotten.len()
            )?;
            for id in &self.forgotten {
                writeln!(f, "  family {id}")?;
            }
        }
        let unreadable: u64 = self
            .dropped
            .iter()
            .filter(|d| !d.torn)
            .map(|d| d.unreadable_bytes)
            .sum();
        if unreadable > 0 {
            writeln!(
                f,
                "{} could not be read as records: a family written \
                 only there cannot be named, and its spent tokens may be redeemable again. \
                 If that is not acceptable, make a new MAC key active and remove the old \
                 one: every token is then refused.",
                count(unreadable, "dropped byte")
            )?;
        }
        if self.rolled_back.is_empty() && self.forgotten.is_empty() && unreadable == 0 {
            writeln!(f, "no family lost its latest state")?;
        }
        Ok(())
    }
}
