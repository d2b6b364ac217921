//! Torn tails: what a crash or power loss leaves at the end of the log is
//! dropped at start; anything else refuses start-up, naming file and offset.

mod store_support;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use refresh_guard::{Error, LogStore};
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
