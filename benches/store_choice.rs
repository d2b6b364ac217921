//! Issue 6: an established embedded engine (redb) or our own append-only
//! log (`LogStore`)? Both measured in the same run on the write pattern a
//! refresh rotation needs: one ~150-byte record per rotation, keyed by a
//! 16-byte family id, overwriting that family's record, acknowledged only
//! once it is durable (fsync), with 1 and 64 concurrent callers.
//!
//! - `redb_put_commit`: one redb write transaction per rotation (insert, then
//!   `commit()` with the default `Durability::Immediate`, which fsyncs before
//!   returning). redb serialises write transactions, so concurrent callers
//!   queue behind each other's fsync.
//! - `logstore_redeem_sync`: `Engine::redeem` over `LogStore` in `sync` mode
//!   (concurrent callers share one fsync: group commit). The engine's
//!   in-memory work (about 0.4 µs per redeem, the `none` case of
//!   `benches/durability.rs`) is included; the store cannot be driven alone
//!   from outside the crate.
//!
//! Latency percentiles are printed after each measurement, from
//! per-operation timings of the same run; so are disk figures (bytes per
//! rotation record, bytes for 1M records, open-and-read time for 1M).

use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use refresh_guard::RedeemRequest;
use refresh_guard::{
    Decision, Durability, Engine, IssueRequest, KeyId, KeyRing, KeySecret, LogOptions, LogStore,
    Token,
};

const CLIENT: &str = "bench";
/// Bytes of a family record handed to redb (the brief's ~150 bytes; the
/// LogStore's own record size is printed alongside).
const RECORD: usize = 150;
/// Families each caller rotates in turn.
const FAMILIES_PER_CALLER: usize = 16;
const FAMILIES: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("families");

fn ip() -> IpAddr {
    "10.0.0.1".parse().expect("ip")
}

fn keys() -> KeyRing {
    KeyRing::new(KeyId(1), &KeySecret::from_bytes([3; 32]))
}

/// The run's scratch root under the temp dir; removed at the end.
fn root() -> PathBuf {
    std::env::temp_dir().join(format!("refresh-guard-store-choice-{}", std::process::id()))
}

fn bench_dir(name: &str) -> PathBuf {
    let d = root().join(name);
    let _ = std::fs::remove_dir_all(&d);
    // The store refuses a directory other users can reach.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .expect("bench dir");
    d
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum()
}

fn family_id(caller: usize, i: usize) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(caller as u64).to_le_bytes());
    id[8..].copy_from_slice(&(i as u64).to_le_bytes());
    id
}

/// A pseudo-random 16-byte id (family ids are random), distinct per `i`.
fn random_id(i: usize) -> [u8; 16] {
    // splitmix64: a bijection, so ids never collide.
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&mix(x).to_le_bytes());
    id[8..].copy_from_slice(&mix(!x).to_le_bytes());
    id
}

/// Split `iters` operations exactly over `callers` threads; `op(caller, k)`
/// runs the caller's k-th operation. Per-operation latency (ns) goes into
/// `lat`; returns the wall time of the whole batch.
fn run<F>(callers: usize, iters: u64, lat: &Mutex<Vec<u32>>, op: F) -> Duration
where
    F: Fn(usize, usize) + Sync,
{
    let base = iters / callers as u64;
    let extra = iters % callers as u64;
    let op = &op;
    let start = Instant::now();
    std::thread::scope(|s| {
        for c in 0..callers {
            let n = (base + u64::from((c as u64) < extra)) as usize;
            if n == 0 {
                continue;
            }
            s.spawn(move || {
                let mut local = Vec::with_capacity(n);
                for k in 0..n {
                    let t0 = Instant::now();
                    op(c, k);
                    local.push(t0.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
                }
                lat.lock().expect("latency lock").extend(local);
            });
        }
    });
    start.elapsed()
}

fn report(id: &str, lat: &Mutex<Vec<u32>>) {
    let mut v = std::mem::take(&mut *lat.lock().expect("latency lock"));
    if v.is_empty() {
        return;
    }
    v.sort_unstable();
    let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    println!(
        "latency {id}: p50 {:.1} us, p99 {:.1} us ({} samples)",
        f64::from(p(0.50)) / 1000.0,
        f64::from(p(0.99)) / 1000.0,
        v.len()
    );
}

/// One rotation in redb: overwrite the family's record in its own write
/// transaction and commit with the default (fsyncing) durability.
fn redb_put(db: &Database, id: &[u8; 16], value: &[u8]) {
    let tx = db.begin_write().expect("begin_write");
    {
        let mut t = tx.open_table(FAMILIES).expect("open_table");
        t.insert(id, value).expect("insert");
    }
    tx.commit().expect("commit");
}

fn redb_db(dir: &Path, callers: usize) -> Database {
    let db = Database::create(dir.join("families.redb")).expect("redb create");
    let tx = db.begin_write().expect("begin_write");
    {
        let mut t = tx.open_table(FAMILIES).expect("open_table");
        for c in 0..callers {
            for i in 0..FAMILIES_PER_CALLER {
                t.insert(&family_id(c, i), &[0u8; RECORD][..])
                    .expect("insert");
            }
        }
    }
    tx.commit().expect("commit");
    db
}

fn engine(dir: &Path, durability: Durability) -> Engine {
    Engine::builder()
        .keys(keys())
        .store(LogStore::open(dir, LogOptions { durability }).expect("store"))
        .build()
        .expect("engine")
}

fn issue(e: &Engine, i: usize) -> Token {
    e.issue(&IssueRequest {
        client: CLIENT,
        subject: &format!("user-{i}"),
        scope: "openid",
        ip: Some(ip()),
    })
    .expect("issue")
    .accepted()
    .expect("issued")
    .token
}

fn rotate(e: &Engine, slot: &Mutex<Token>) {
    // Each caller owns its slots: the lock is never contended.
    let mut t = slot.lock().expect("token lock");
    match e
        .redeem(&RedeemRequest::new(&t, CLIENT).ip(ip()))
        .expect("store")
    {
        Decision::Accept(a) => *t = a.token,
        Decision::Deny(d) => panic!("denied: {}", d.reason),
    }
}

fn store_choice(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_choice");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    g.sample_size(15);

    for callers in [1, 64] {
        let id = format!("redb_put_commit/{}", callers_label(callers));
        let dir = bench_dir(&format!("redb-{callers}"));
        let db = redb_db(&dir, callers);
        let lat = Mutex::new(Vec::new());
        g.bench_function(BenchmarkId::from_parameter(&id), |b| {
            b.iter_custom(|iters| {
                run(callers, iters, &lat, |c, k| {
                    let mut value = [0x5a; RECORD];
                    value[..8].copy_from_slice(&(k as u64).to_le_bytes());
                    redb_put(&db, &family_id(c, k % FAMILIES_PER_CALLER), &value);
                })
            })
        });
        report(&id, &lat);
        drop(db);
        println!(
            "disk {id}: redb file {} bytes for {} families after the run",
            dir_bytes(&dir),
            callers * FAMILIES_PER_CALLER
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    for callers in [1, 64] {
        let id = format!("logstore_redeem_sync/{}", callers_label(callers));
        let dir = bench_dir(&format!("logstore-{callers}"));
        let e = engine(&dir, Durability::Sync);
        let tokens: Vec<Vec<Mutex<Token>>> = (0..callers)
            .map(|c| {
                (0..FAMILIES_PER_CALLER)
                    .map(|i| Mutex::new(issue(&e, c * FAMILIES_PER_CALLER + i)))
                    .collect()
            })
            .collect();
        let lat = Mutex::new(Vec::new());
        g.bench_function(BenchmarkId::from_parameter(&id), |b| {
            b.iter_custom(|iters| {
                run(callers, iters, &lat, |c, k| {
                    rotate(&e, &tokens[c][k % FAMILIES_PER_CALLER])
                })
            })
        });
        report(&id, &lat);
        drop(e);
        let _ = std::fs::remove_dir_all(&dir);
    }
    g.finish();
}

/// Not a rotation pattern, printed for context: one redb commit carrying 64
/// records (one per family), i.e. what a group-commit writer thread built on
/// top of redb would pay per batch.
fn redb_batch(_: &mut Criterion) {
    const BATCH: usize = 64;
    const COMMITS: usize = 300;
    let dir = bench_dir("redb-batch");
    let db = redb_db(&dir, BATCH);
    let mut lat = Vec::with_capacity(COMMITS);
    for k in 0..COMMITS {
        let mut value = [0x5a; RECORD];
        value[..8].copy_from_slice(&(k as u64).to_le_bytes());
        let t0 = Instant::now();
        let tx = db.begin_write().expect("begin_write");
        {
            let mut t = tx.open_table(FAMILIES).expect("open_table");
            for c in 0..BATCH {
                t.insert(&family_id(c, k % FAMILIES_PER_CALLER), &value[..])
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
        lat.push(t0.elapsed());
    }
    lat.sort_unstable();
    let p50 = lat[COMMITS / 2];
    println!(
        "redb batch: one commit of {BATCH} records: p50 {:.1} us, p99 {:.1} us \
         (ceiling {:.1} K records/s for a group-commit writer over redb)",
        p50.as_secs_f64() * 1e6,
        lat[COMMITS * 99 / 100].as_secs_f64() * 1e6,
        BATCH as f64 / p50.as_secs_f64() / 1000.0
    );
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}

fn callers_label(callers: usize) -> String {
    if callers == 1 {
        "1_caller".to_owned()
    } else {
        format!("{callers}_callers")
    }
}

/// Disk figures, printed: what one rotation appends to the LogStore, and
/// what 1M records cost redb on disk and to open and read back.
fn disk(_: &mut Criterion) {
    const ROTATIONS: usize = 10_000;
    {
        // Record size does not depend on the durability mode; batched keeps
        // this quick.
        let dir = bench_dir("logstore-record");
        let e = engine(&dir, Durability::Batched(Duration::from_millis(10)));
        let slots: Vec<Mutex<Token>> = (0..FAMILIES_PER_CALLER)
            .map(|i| Mutex::new(issue(&e, i)))
            .collect();
        e.flush().expect("flush");
        let before = dir_bytes(&dir);
        for k in 0..ROTATIONS {
            rotate(&e, &slots[k % FAMILIES_PER_CALLER]);
        }
        e.flush().expect("flush");
        println!(
            "disk logstore: {:.0} bytes appended per rotation (17 of them framing; {ROTATIONS} \
             rotations)",
            (dir_bytes(&dir) - before) as f64 / ROTATIONS as f64
        );
        drop(e);
        let _ = std::fs::remove_dir_all(&dir);
    }

    const N: usize = 1_000_000;
    const BATCH: usize = 100_000;
    let dir = bench_dir("redb-1m");
    let path = dir.join("families.redb");
    let mut db = Database::create(&path).expect("redb create");
    let t0 = Instant::now();
    for b in 0..N / BATCH {
        let tx = db.begin_write().expect("begin_write");
        {
            let mut t = tx.open_table(FAMILIES).expect("open_table");
            for i in b * BATCH..(b + 1) * BATCH {
                t.insert(&random_id(i), &[0x5a; RECORD][..])
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    let load = t0.elapsed();
    let written = dir_bytes(&dir);
    db.compact().expect("compact");
    let compacted = dir_bytes(&dir);
    drop(db);
    println!(
        "disk redb: {N} records of 16 + {RECORD} bytes, random keys: {written} bytes after \
         load ({:.0} per record, {load:.2?}), {compacted} bytes after compact ({:.0} per record, \
         {:.0} beyond key and value)",
        written as f64 / N as f64,
        compacted as f64 / N as f64,
        compacted as f64 / N as f64 - (16 + RECORD) as f64
    );
    let t0 = Instant::now();
    let db = Database::open(&path).expect("redb open");
    let tx = db.begin_read().expect("begin_read");
    let t = tx.open_table(FAMILIES).expect("open_table");
    let mut bytes = 0usize;
    for row in t.iter().expect("iter") {
        let (_, v) = row.expect("row");
        bytes += v.value().len();
    }
    println!(
        "recovery redb: open and read all {} records ({bytes} value bytes) in {:.2?}",
        t.len().expect("len"),
        t0.elapsed()
    );
    drop(t);
    drop(tx);
    drop(db);
    let _ = std::fs::remove_dir_all(root());
}

criterion_group!(benches, store_choice, redb_batch, disk);
criterion_main!(benches);
