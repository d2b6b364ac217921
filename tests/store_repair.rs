//! Torn tails and repair: what a crash or power loss leaves at the end of
//! the log is dropped at start; anything else refuses start-up, naming the
//! one-shot `refresh-guard store repair DIR` that drops it (saved aside) and
//! names the families whose latest state it held.

mod store_support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use refresh_guard::RedeemRequest;
use refresh_guard::{DenyReason, Error, LogStore};
use store_support::*;

/// Each record of a segment: (offset, length with its header).
fn records(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut off = 0;
    while off + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        v.push((off, 8 + len));
        off += 8 + len;
    }
    v
}

fn append(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

/// Run `f` with the store's log lines captured.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

/// A store with alice rotated once; her current token and the segment.
fn one_rotation(dir: &Path) -> (refresh_guard::Token, std::path::PathBuf) {
    let t2 = {
        let e = open(dir);
        let t1 = issue(&e, "alice");
        rotate(&e, &t1)
    };
    (t2, segments(dir).pop().unwrap())
}

/// Regression: a zero-filled log tail (power loss after the file was
/// extended, before its data landed) refused start-up as corruption. From
/// the first impossible length in the last segment to its end every byte is
/// zero: a torn tail, dropped with a log line.
#[test]
fn zero_filled_tail_is_dropped_at_start() {
    let dir = temp_dir("zero-tail");
    let (t2, seg) = one_rotation(&dir);
    let len = std::fs::metadata(&seg).unwrap().len();
    append(&seg, &[0; 4096]);
    let (e, log) = logged(|| open(&dir));
    assert!(
        log.contains("dropping a torn last record")
            && log.contains("zero_filled=true")
            && log.contains(&*seg.to_string_lossy()),
        "a log line naming the file: {log:?}"
    );
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len, "cut back");
    rotate(&e, &t2);
}

/// Regression (same defect): a record whose first bytes landed and whose
/// rest, and everything after it, is zeros (a power loss inside a block) is
/// a torn tail too.
#[test]
fn record_cut_by_a_zero_filled_tail_is_dropped_at_start() {
    let dir = temp_dir("zero-record");
    let (t2, seg) = one_rotation(&dir);
    let bytes = std::fs::read(&seg).unwrap();
    let (off, n) = *records(&bytes).last().unwrap();
    append(&seg, &bytes[off..off + n / 2]);
    append(&seg, &[0; 4096]);
    let e = open(&dir);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), bytes.len() as u64);
    rotate(&e, &t2);
}

/// Zeros with data after them are not a torn tail, nor are zeros at the
/// end of a segment a newer one follows: both refuse start-up, naming file
/// and offset.
#[test]
fn zeros_that_are_not_a_torn_tail_refuse_to_open() {
    let dir = temp_dir("zero-hole");
    let (_, seg) = one_rotation(&dir);
    let bytes = std::fs::read(&seg).unwrap();
    let (off, n) = *records(&bytes).last().unwrap();
    append(&seg, &[0; 4096]);
    append(&seg, &bytes[off..off + n]);
    match LogStore::open(&*dir, Default::default()) {
        Err(Error::Corrupt { file, offset, .. }) => {
            assert_eq!((file, offset), (seg.clone(), bytes.len() as u64));
        }
        other => panic!("expected corruption, got {:?}", other.err()),
    }

    let dir = temp_dir("zero-not-last");
    let (_, seg) = one_rotation(&dir);
    drop(open(&dir)); // a restart starts a new (empty) segment after it
    assert!(segments(&dir).last().unwrap() != &seg);
    let len = std::fs::metadata(&seg).unwrap().len();
    append(&seg, &[0; 4096]);
    match LogStore::open(&*dir, Default::default()) {
        Err(Error::Corrupt { file, offset, .. }) => assert_eq!((file, offset), (seg, len)),
        other => panic!("expected corruption, got {:?}", other.err()),
    }
}

/// Found in review: the checksum does not cover the length field, so a
/// length flipped to point past the end of the last segment made every
/// whole record after it look like one record cut short, and start-up
/// dropped them all as a torn tail: acknowledged rotations lost without a
/// word. A record cut short with whole records behind it is corruption.
#[test]
fn a_length_pointing_past_the_end_over_whole_records_refuses_to_open() {
    let dir = temp_dir("length-flip");
    {
        let e = open(&dir);
        let t = issue(&e, "alice");
        let t = rotate(&e, &t);
        rotate(&e, &t);
    }
    let seg = segments(&dir).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let recs = records(&bytes);
    assert!(recs.len() >= 3, "{recs:?}");
    let (off, _) = recs[recs.len() - 3];
    let past_end = (bytes.len() - off - 8 + 100) as u32;
    bytes[off..off + 4].copy_from_slice(&past_end.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    match LogStore::open(&*dir, Default::default()) {
        Err(Error::Corrupt { file, offset, .. }) => {
            assert_eq!((file, offset), (seg.clone(), off as u64));
        }
        other => panic!(
            "expected corruption, got {:?}",
            other.err().map(|e| e.to_string())
        ),
    }
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing cut");
}

/// Regression: the refusal told the operator to "start with repair" (a
/// `serve` flag that then stays in a unit file forever). It names the
/// one-shot command to run instead, with the directory.
#[test]
fn refused_start_names_the_repair_command() {
    let dir = temp_dir("refusal");
    let (_, seg) = one_rotation(&dir);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&seg, &bytes).unwrap();
    let e = LogStore::open(&*dir, Default::default()).err().unwrap();
    let text = e.to_string();
    assert!(
        text.contains(&format!("refresh-guard store repair {}", dir.display())),
        "{text}"
    );
}

/// Four records and a fifth: alice issued, bob issued, alice rotated, bob
/// rotated (the record corrupted), alice rotated again (readable, but after
/// the corruption). Returns alice's tokens of generations 2 and 3, bob's
/// first token, alice's family and the segment's bytes before corruption.
struct Scenario {
    a2: refresh_guard::Token,
    a3: refresh_guard::Token,
    b1: refresh_guard::Token,
    alice: refresh_guard::FamilyId,
    seg: std::path::PathBuf,
    bytes: Vec<u8>,
    corrupt_at: usize,
}

fn corrupt_bobs_rotation(dir: &Path) -> Scenario {
    let (a2, a3, b1, alice) = {
        let e = open(dir);
        let a1 = issue(&e, "alice");
        let b1 = issue(&e, "bob");
        let a2 = rotate(&e, &a1);
        rotate(&e, &b1);
        let d = e.redeem(&RedeemRequest::new(&a2, CLIENT).ip(ip())).unwrap();
        let a = d.accepted().unwrap();
        (a2, a.token, b1, a.family)
    };
    let seg = segments(dir).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let recs = records(&bytes);
    assert_eq!(recs.len(), 5, "one record per change");
    let (corrupt_at, n) = recs[3];
    let original = bytes.clone();
    bytes[corrupt_at + n - 1] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();
    Scenario {
        a2,
        a3,
        b1,
        alice,
        seg,
        bytes: original,
        corrupt_at,
    }
}

/// `LogStore::repair` cuts the file at the corrupt record after saving the
/// rest aside (0600, in a 0700 directory), and names the family whose
/// latest state was dropped though readable (alice) with the warning that
/// her spent token works again; bob's rotation was in the unreadable bytes
/// and is counted, not named. A second repair finds nothing to do.
#[test]
fn repair_saves_the_dropped_bytes_and_names_rolled_back_families() {
    let dir = temp_dir("repair");
    let s = corrupt_bobs_rotation(&dir);
    assert!(matches!(
        LogStore::open(&*dir, Default::default()),
        Err(Error::Corrupt { .. })
    ));
    let report = LogStore::repair(&*dir).unwrap();
    assert_eq!(report.dir, dir.to_path_buf());
    assert_eq!(report.dropped.len(), 1, "{report}");
    let d = &report.dropped[0];
    assert_eq!(d.file, s.seg);
    assert_eq!(d.offset, s.corrupt_at as u64);
    assert_eq!(d.bytes, (s.bytes.len() - s.corrupt_at) as u64);
    assert!(!d.torn);
    assert_eq!(d.readable_records, 1);
    let alices = records(&s.bytes)[4].1 as u64;
    assert_eq!(d.unreadable_bytes, d.bytes - alices);
    let saved = std::fs::read(&d.saved_to).unwrap();
    let mut expected = s.bytes[s.corrupt_at..].to_vec();
    let bob_end = records(&s.bytes)[3].1 - 1;
    expected[bob_end] ^= 0x55;
    assert_eq!(saved, expected, "the dropped bytes, as they were");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.saved_to), 0o600);
    assert_eq!(mode(d.saved_to.parent().unwrap()), 0o700);
    assert_eq!(
        std::fs::metadata(&s.seg).unwrap().len(),
        s.corrupt_at as u64
    );
    assert_eq!(report.rolled_back.len(), 1, "{report}");
    let r = &report.rolled_back[0];
    assert_eq!((r.id, &*r.client, &*r.subject), (s.alice, CLIENT, "alice"));
    assert!(report.forgotten.is_empty());
    let text = report.to_string();
    for want in [
        "may be redeemable again",
        &s.alice.to_string(),
        "\"alice\"",
        "could not be read",
        &d.saved_to.display().to_string(),
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }

    // What the report warns of: alice's spent generation-2 token is current
    // again, her generation-3 token is a rollback; bob's spent token works.
    let e = open(&dir);
    assert_eq!(
        e.redeem(&RedeemRequest::new(&s.a3, CLIENT).ip(ip()))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::StateRollback)
    );
    rotate(&e, &s.a2);
    rotate(&e, &s.b1);
    drop(e);
    let again = LogStore::repair(&*dir).unwrap();
    assert!(again.dropped.is_empty());
    assert!(again.to_string().contains("nothing changed"), "{again}");
}

/// A repair that cannot save the dropped bytes aside changes nothing.
#[test]
fn repair_that_cannot_save_aside_changes_nothing() {
    let dir = temp_dir("repair-blocked");
    let s = corrupt_bobs_rotation(&dir);
    let before = std::fs::read(&s.seg).unwrap();
    std::fs::write(dir.join("dropped"), b"in the way").unwrap();
    let e = LogStore::repair(&*dir).err().unwrap();
    assert!(e.to_string().contains("dropped"), "{e}");
    assert_eq!(std::fs::read(&s.seg).unwrap(), before);
}

/// DIR is a store directory or a server data directory holding `log/`; a
/// directory with neither, or both, is refused, naming both paths.
#[test]
fn repair_takes_a_store_or_a_data_directory() {
    let data = temp_dir("repair-data");
    let log = data.join("log");
    corrupt_bobs_rotation(&log);
    let report = LogStore::repair(&*data).unwrap();
    assert_eq!(report.dir, log);
    assert_eq!(report.dropped.len(), 1);

    let empty = temp_dir("repair-empty");
    let e = LogStore::repair(&*empty).err().unwrap().to_string();
    assert!(
        e.contains("no store here") && e.contains(&empty.join("log").display().to_string()),
        "{e}"
    );

    std::fs::copy(
        segments(&log).pop().unwrap(),
        data.join("log-00000000000000000001.rgl"),
    )
    .unwrap();
    let e = LogStore::repair(&*data).err().unwrap().to_string();
    assert!(e.contains("name the one to repair"), "{e}");
}
