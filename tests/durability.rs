//! The embedded durable store: recovery, torn and corrupt files, compaction,
//! group commit, and crash safety under SIGKILL.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use refresh_guard::RedeemRequest;
use refresh_guard::{
    AcceptKind, Decision, DenyReason, Durability, Engine, Error, IssueRequest, KeyId, KeyRing,
    KeySecret, LogOptions, LogStore, Token,
};

mod store_support;

use store_support::{Failpoint, Recording};

const CLIENT: &str = "app";

fn ip() -> IpAddr {
    "10.0.0.1".parse().unwrap()
}

fn keys() -> KeyRing {
    KeyRing::new(KeyId(1), &KeySecret::from_bytes([7; 32]))
}

/// A directory removed when the test ends.
struct TempDir(PathBuf);

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

fn temp_dir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!(
        "refresh-guard-{name}-{}-{}",
        std::process::id(),
        rand_seed()
    ));
    let _ = std::fs::remove_dir_all(&d);
    // 0700: the store refuses a directory other users can reach.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&d)
        .unwrap();
    TempDir(d)
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn open_with(dir: &Path, options: LogOptions) -> Result<Engine, Error> {
    Engine::builder()
        .keys(keys())
        .store(LogStore::open(dir, options)?)
        .build()
}

fn open(dir: &Path) -> Engine {
    open_with(dir, LogOptions::default()).unwrap()
}

fn issue(e: &Engine, subject: &str) -> Token {
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

fn rotate(e: &Engine, t: &str) -> Token {
    let d = e.redeem(&RedeemRequest::new(t, CLIENT).ip(ip())).unwrap();
    let a = d.accepted().unwrap_or_else(|| panic!("{d:?}"));
    assert_eq!(a.kind, AcceptKind::Rotated);
    a.token
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rgl"))
        .collect();
    v.sort();
    v
}

/// Everything acknowledged survives a restart: current tokens work,
/// rotated-out ones are reuse, revoked families stay revoked.
#[test]
fn state_survives_restart() {
    let dir = temp_dir("restart");
    let (t1, t2, revoked) = {
        let e = open(&dir);
        let t1 = issue(&e, "alice");
        let t2 = rotate(&e, &t1);
        let r = issue(&e, "bob");
        assert!(e.revoke_token(&r, None).unwrap());
        (t1, t2, r)
    };
    let e = open(&dir);
    assert_eq!(e.stats().families, 2);
    let t3 = rotate(&e, &t2);
    assert_eq!(
        e.redeem(&RedeemRequest::new(&t1, CLIENT).ip(ip()))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::ReuseDetected)
    );
    assert_eq!(
        e.redeem(&RedeemRequest::new(&t3, CLIENT).ip(ip()))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked),
        "the reuse revocation was persisted too"
    );
    assert_eq!(
        e.redeem(&RedeemRequest::new(&revoked, CLIENT).ip(ip()))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked)
    );
    drop(e);
    let e = open(&dir);
    assert_eq!(
        e.redeem(&RedeemRequest::new(&t3, CLIENT).ip(ip()))
            .unwrap()
            .deny_reason(),
        Some(DenyReason::Revoked)
    );
}

/// Swept families stay swept after a restart.
#[test]
fn sweep_removals_are_persisted() {
    let dir = temp_dir("sweep");
    {
        let e = open(&dir);
        let t = issue(&e, "alice");
        e.revoke_token(&t, None).unwrap();
        issue(&e, "bob");
        e.at(e.now().saturating_add(Duration::from_secs(2 * 86_400)))
            .sweep(1_000_000)
            .unwrap();
        assert_eq!(e.stats().families, 1, "the revoked one, past retention");
        e.flush().unwrap();
    }
    assert_eq!(open(&dir).stats().families, 1);
}

/// Collects log output for assertions.
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

/// A torn last record (a write cut short by a crash) is dropped with a log
/// line; the store opens and everything before it is intact.
#[test]
fn torn_last_record_is_dropped() {
    let dir = temp_dir("torn");
    let t2 = {
        let e = open(&dir);
        let t1 = issue(&e, "alice");
        rotate(&e, &t1)
    };
    let seg = segments(&dir).pop().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    // A header promising 200 bytes, and only 30 of them.
    f.write_all(&200u32.to_le_bytes()).unwrap();
    f.write_all(&[0xAB; 34]).unwrap();
    drop(f);
    let len_before = std::fs::metadata(&seg).unwrap().len();
    let log = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .with_ansi(false)
        .finish();
    let e = tracing::subscriber::with_default(subscriber, || open(&dir));
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("dropping a torn last record") && log.contains(&*seg.to_string_lossy()),
        "log line naming the file: {log:?}"
    );
    assert!(
        std::fs::metadata(&seg).unwrap().len() < len_before,
        "truncated"
    );
    rotate(&e, &t2);
}

/// A byte flipped in the middle of a file refuses start-up with an error
/// naming the file and offset and the repair command to run; after
/// `LogStore::repair` it opens, without the rest of that file.
#[test]
fn corruption_in_the_middle_refuses_to_open() {
    let dir = temp_dir("corrupt");
    {
        let e = open(&dir);
        for i in 0..5 {
            let t = issue(&e, &format!("u{i}"));
            rotate(&e, &t);
        }
    }
    let seg = segments(&dir)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let err = open_with(&dir, LogOptions::default())
        .err()
        .expect("refused");
    match &err {
        Error::Corrupt { file, offset, .. } => {
            assert_eq!(file, &seg);
            assert!(*offset <= middle as u64);
        }
        other => panic!("wrong error: {other}"),
    }
    let text = err.to_string();
    assert!(text.contains(&seg.display().to_string()), "{text}");
    assert!(text.contains("offset"), "{text}");
    assert!(
        text.contains(&format!("refresh-guard store repair {}", dir.display())),
        "{text}"
    );
    let report = LogStore::repair(&*dir).unwrap();
    assert_eq!(report.dropped.len(), 1, "{report}");
    let repaired = open(&dir);
    assert!(repaired.stats().families >= 1);
}

/// Regression (found by the `log_segment` fuzz target, FUZZING.md): a
/// checksummed record carrying LSN `u64::MAX` made recovery compute the
/// next LSN as `u64::MAX + 1`, a panic in debug builds and, in release, a
/// store numbering its next write 0, the "nothing written" LSN. Such a
/// record, like one with LSN 0 or any at 2^63 and above, is now refused as
/// corruption at its offset, the file left as it was, and repair cuts it.
#[test]
fn a_record_with_an_lsn_no_writer_assigns_refuses_to_open() {
    for bad in [u64::MAX, 1 << 63, 0] {
        let dir = temp_dir("bad-lsn");
        {
            let e = open(&dir);
            let t = issue(&e, "u");
            rotate(&e, &t);
        }
        let seg = segments(&dir)
            .into_iter()
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        // The second record: [len u32][crc u32][kind u8][lsn u64]..., its
        // checksum recomputed so that only the LSN is wrong.
        let first = 8 + u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        let len = u32::from_le_bytes(bytes[first..first + 4].try_into().unwrap()) as usize;
        bytes[first + 9..first + 17].copy_from_slice(&bad.to_le_bytes());
        let crc = crc32(&bytes[first + 8..first + 8 + len]);
        bytes[first + 4..first + 8].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&seg, &bytes).unwrap();

        let err = open_with(&dir, LogOptions::default())
            .err()
            .expect("refused");
        match &err {
            Error::Corrupt {
                file,
                offset,
                detail,
            } => {
                assert_eq!(file, &seg);
                assert_eq!(*offset, first as u64, "{err}");
                assert!(detail.contains("LSN no writer assigns"), "{err}");
            }
            other => panic!("wrong error for LSN {bad}: {other}"),
        }
        assert_eq!(
            std::fs::read(&seg).unwrap(),
            bytes,
            "a refusal changed the file"
        );
        let report = LogStore::repair(&*dir).unwrap();
        assert_eq!(report.dropped.len(), 1, "{report}");
        assert_eq!(open(&dir).stats().families, 1);
    }
}

/// CRC-32 (IEEE, as `crc32fast` computes it), bit by bit: the test's own
/// reference, not the store's code.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Compaction replaces the log by a snapshot, also while redemptions run,
/// and recovery from snapshot plus newer segments is exact.
#[test]
fn compaction_keeps_state_exact() {
    let dir = temp_dir("compact");
    let e = Arc::new(open(&dir));
    let tokens: Vec<Token> = (0..200).map(|i| issue(&e, &format!("u{i}"))).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let finals = std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let mut ts = tokens.clone();
            for round in 0..5 {
                for t in ts.iter_mut() {
                    *t = rotate(&e, t);
                }
                let _ = round;
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            ts
        });
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            e.compact().unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        worker.join().unwrap()
    });
    e.compact().unwrap();
    let more = rotate(&e, &finals[0]);
    drop(e);
    assert!(
        segments(&dir).len() <= 2,
        "old segments removed: {:?}",
        segments(&dir)
    );
    let e = open(&dir);
    assert_eq!(e.stats().families, 200);
    rotate(&e, &more);
    for t in &finals[1..] {
        rotate(&e, t);
    }
}

/// Many concurrent callers in sync mode share fsyncs (group commit), and
/// each is acknowledged only once its change is written and synced. The
/// writer's failpoint records how far the log is synced and each caller
/// checks, the moment its rotation is acknowledged, that the LSN its change
/// got is within: an acknowledgement before the write fails here, not only
/// after a crash. The restart then reads a copy of the directory taken
/// before the store is dropped (a drop writes what is still pending), as a
/// crash would leave it.
#[test]
fn concurrent_sync_redemptions_are_all_durable() {
    let dir = temp_dir("group");
    let fp = Arc::new(Failpoint::default());
    let store =
        Arc::new(LogStore::open_with_hooks(&*dir, LogOptions::default(), fp.clone()).unwrap());
    let e = Engine::builder()
        .keys(keys())
        .store(Recording::new(store.clone()))
        .build()
        .unwrap();
    let start: Vec<Token> = (0..32).map(|i| issue(&e, &format!("u{i}"))).collect();
    let finals: Vec<Token> = std::thread::scope(|s| {
        let hs: Vec<_> = start
            .iter()
            .map(|t| {
                let (e, fp) = (&e, &fp);
                s.spawn(move || {
                    let mut t = *t;
                    for _ in 0..20 {
                        t = rotate(e, &t);
                        let lsn = Recording::last_on_this_thread();
                        let synced = fp.synced();
                        assert!(
                            synced >= lsn,
                            "LSN {lsn} acknowledged before it was synced (synced through {synced})"
                        );
                    }
                    t
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let copy = temp_dir("group-copy");
    for f in std::fs::read_dir(&*dir).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    drop(e);
    drop(store);
    let e = open(&copy);
    for t in &finals {
        assert_eq!(e.introspect(t).unwrap().generation.get(), 21);
        rotate(&e, t);
    }
}

/// Batched mode acknowledges at once; a flush makes it durable.
#[test]
fn batched_mode_flushes() {
    let dir = temp_dir("batched");
    let t = {
        let e = open_with(
            &dir,
            LogOptions {
                durability: Durability::Batched(Duration::from_millis(20)),
            },
        )
        .unwrap();
        assert_eq!(
            e.durability(),
            Durability::Batched(Duration::from_millis(20))
        );
        let t = issue(&e, "alice");
        let t = rotate(&e, &t);
        e.flush().unwrap();
        t
    };
    rotate(&open(&dir), &t);
}

/// A batched writer waits out its interval only while nobody asks: `flush`
/// and shutdown (dropping the engine) make pending changes durable at once.
#[test]
fn batched_flush_and_shutdown_do_not_wait_out_the_interval() {
    let dir = temp_dir("batched-long");
    let long = LogOptions {
        durability: Durability::Batched(Duration::from_secs(600)),
    };
    let started = std::time::Instant::now();
    let (flushed, dropped) = {
        let e = open_with(&dir, long.clone()).unwrap();
        let t = issue(&e, "alice");
        let flushed = rotate(&e, &t);
        e.flush().unwrap();
        // Acknowledged, not flushed: only shutdown can save it.
        let dropped = rotate(&e, &issue(&e, "bob"));
        (flushed, dropped)
    };
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "flush or shutdown waited out the 600 s interval ({:?})",
        started.elapsed()
    );
    let e = open(&dir);
    rotate(&e, &flushed);
    rotate(&e, &dropped);
}

/// The async form completes once durable, without blocking the poller.
#[test]
fn redeem_async_completes_when_durable() {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let dir = temp_dir("async");
    let e = open(&dir);
    let t = issue(&e, "alice");
    let mut fut = Box::pin(
        e.redeem_async(&RedeemRequest::new(&t, CLIENT).ip(ip()))
            .unwrap(),
    );
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let d = loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(r) => break r.unwrap(),
            Poll::Pending => std::thread::park_timeout(Duration::from_millis(50)),
        }
    };
    assert_eq!(d.accepted().unwrap().kind, AcceptKind::Rotated);
}

/// `Durability::None` is not a store mode.
#[test]
fn none_is_refused_for_a_store() {
    let dir = temp_dir("none");
    let r = LogStore::open(
        &*dir,
        LogOptions {
            durability: Durability::None,
        },
    );
    assert!(matches!(r, Err(Error::InvalidArgument { .. })));
}

// ---- crash safety under SIGKILL -------------------------------------------

/// The child side of `acknowledged_rotations_survive_sigkill`: redeems
/// forever in sync mode, printing every acknowledged token. Does nothing
/// unless started by that test.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("REFRESH_GUARD_CRASH_DIR") else {
        return;
    };
    let e = open(Path::new(&dir));
    let mut out = std::io::stdout().lock();
    let mut tokens: Vec<Token> = (0..4).map(|i| issue(&e, &format!("c{i}"))).collect();
    for (i, t) in tokens.iter().enumerate() {
        writeln!(out, "ACK {i} 1 {}", t.as_str()).unwrap();
    }
    out.flush().unwrap();
    let mut n = 0usize;
    loop {
        let i = n % tokens.len();
        let d = e
            .redeem(&RedeemRequest::new(&tokens[i], CLIENT).ip(ip()))
            .unwrap();
        let Decision::Accept(a) = d else {
            panic!("child denied: {d:?}");
        };
        tokens[i] = a.token;
        // Printed only after redeem returned: acknowledged = durable.
        writeln!(out, "ACK {i} {} {}", a.generation, a.token.as_str()).unwrap();
        out.flush().unwrap();
        n += 1;
    }
}

/// A child redeems continuously in sync mode and is SIGKILLed at random
/// moments, 20 times; after each restart every acknowledged rotation is
/// present, no rotated-out token is accepted, and nothing is corrupt.
#[test]
fn acknowledged_rotations_survive_sigkill() {
    let dir = temp_dir("crash");
    let exe = std::env::current_exe().unwrap();
    let mut seed = rand_seed() | 1;
    eprintln!("crash test seed {seed}");
    let mut total_acks = 0;
    let mut total_checked_reuse = 0;
    for round in 0..20 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("REFRESH_GUARD_CRASH_DIR", &*dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let run_for = Duration::from_millis(30 + seed % 300);
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acks: Vec<(usize, u32, String)> = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut p = line.split_whitespace();
                if p.next() != Some("ACK") {
                    continue;
                }
                let (Some(i), Some(g), Some(t)) = (p.next(), p.next(), p.next()) else {
                    continue;
                };
                acks.push((i.parse().unwrap(), g.parse().unwrap(), t.to_owned()));
            }
            acks
        });
        std::thread::sleep(run_for);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acks = reader.join().unwrap();
        total_acks += acks.len();
        // Restart on the same directory: must open without repair.
        let e = open_with(&dir, LogOptions::default())
            .unwrap_or_else(|err| panic!("round {round}: restart failed: {err}"));
        let mut last: std::collections::HashMap<usize, (u32, String)> = Default::default();
        let mut older: Vec<String> = Vec::new();
        for (i, g, t) in acks {
            if let Some((_, prev)) = last.insert(i, (g, t)) {
                older.push(prev);
            }
        }
        for (g, t) in last.values() {
            let info = e
                .introspect(t)
                .unwrap_or_else(|| panic!("round {round}: acknowledged generation {g} is missing"));
            let cur = info.current_generation.get();
            // Acknowledged is durable; one more rotation may have become
            // durable without being acknowledged.
            assert!(
                cur == *g || cur == *g + 1,
                "round {round}: acknowledged {g}, recovered {cur}"
            );
        }
        for t in &older {
            let info = e.introspect(t).unwrap();
            assert!(
                !info.active,
                "round {round}: a rotated-out token is active again"
            );
        }
        if let Some(t) = older.last() {
            assert_eq!(
                e.redeem(&RedeemRequest::new(t, CLIENT).ip(ip()))
                    .unwrap()
                    .deny_reason(),
                Some(DenyReason::ReuseDetected),
                "round {round}: a rotated-out token must be reuse"
            );
            total_checked_reuse += 1;
        }
        drop(e);
    }
    eprintln!("{total_acks} acknowledged rotations, {total_checked_reuse} rounds replayed one");
    assert!(
        total_acks > 100,
        "the child made too little progress to test anything"
    );
    assert!(total_checked_reuse >= 10);
}
