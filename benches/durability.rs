//! Durable redemption: throughput and latency in `sync` mode with 1, 2 and
//! 64 concurrent callers, `batched` and `none` alongside, and recovery time
//! for 1M families.
//!
//! Latency percentiles are printed after each measurement (criterion reports
//! mean throughput; p50/p99 come from per-operation timings of the same run).

use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use refresh_guard::RedeemRequest;
use refresh_guard::{
    Decision, Durability, Engine, IssueRequest, KeyId, KeyRing, KeySecret, LogOptions, LogStore,
    Token,
};

const CLIENT: &str = "bench";

fn ip() -> IpAddr {
    "10.0.0.1".parse().expect("ip")
}

fn keys() -> KeyRing {
    KeyRing::new(KeyId(1), &KeySecret::from_bytes([3; 32]))
}

fn bench_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("refresh-guard-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    // The store refuses a directory other users can reach.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .expect("bench dir");
    d
}

fn engine(mode: Durability, dir: &Path) -> Engine {
    let b = Engine::builder().keys(keys());
    match mode {
        Durability::None => b.build().expect("engine"),
        d => b
            .store(LogStore::open(dir, LogOptions { durability: d }).expect("store"))
            .build()
            .expect("engine"),
    }
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

/// Run `iters` redemptions split over `callers` threads, each on its own
/// families; record per-operation latency (ns) into `lat`.
fn run(e: &Engine, tokens: &mut [Vec<Token>], iters: u64, lat: &Mutex<Vec<u32>>) -> Duration {
    let callers = tokens.len() as u64;
    let per = iters.div_ceil(callers);
    let start = Instant::now();
    std::thread::scope(|s| {
        for mine in tokens.iter_mut() {
            s.spawn(move || {
                let mut local = Vec::with_capacity(per as usize);
                for k in 0..per as usize {
                    let i = k % mine.len();
                    let t0 = Instant::now();
                    match e
                        .redeem(&RedeemRequest::new(&mine[i], CLIENT).ip(ip()))
                        .expect("store")
                    {
                        Decision::Accept(a) => mine[i] = a.token,
                        Decision::Deny(d) => panic!("denied: {}", d.reason),
                    }
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

fn durable_redeem(c: &mut Criterion) {
    let mut g = c.benchmark_group("durable_redeem");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(6));
    g.sample_size(20);
    let cases: [(&str, Durability, usize); 6] = [
        ("sync", Durability::Sync, 1),
        ("sync", Durability::Sync, 2),
        ("sync", Durability::Sync, 64),
        (
            "batched_10ms",
            Durability::Batched(Duration::from_millis(10)),
            64,
        ),
        ("none", Durability::None, 1),
        ("none", Durability::None, 64),
    ];
    for (name, mode, callers) in cases {
        let dir = bench_dir(&format!("{name}-{callers}"));
        let e = engine(mode, &dir);
        let mut tokens: Vec<Vec<Token>> = (0..callers)
            .map(|c| (0..16).map(|i| issue(&e, c * 16 + i)).collect())
            .collect();
        let lat = Mutex::new(Vec::new());
        let id = format!("{name}/{callers}_callers");
        g.bench_function(BenchmarkId::from_parameter(&id), |b| {
            b.iter_custom(|iters| run(&e, &mut tokens, iters, &lat))
        });
        report(&id, &lat);
        drop(e);
        let _ = std::fs::remove_dir_all(&dir);
    }
    g.finish();
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum()
}

fn recovery(c: &mut Criterion) {
    const N: usize = 1_000_000;
    let dir = bench_dir("recovery");
    {
        let e = engine(Durability::Batched(Duration::from_millis(50)), &dir);
        for i in 0..N {
            issue(&e, i);
        }
        e.compact().expect("compact");
        e.flush().expect("flush");
    }
    println!(
        "disk: {} bytes for {N} families = {:.0} bytes per family (snapshot after compaction)",
        dir_bytes(&dir),
        dir_bytes(&dir) as f64 / N as f64
    );
    let mut g = c.benchmark_group("recovery");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function(BenchmarkId::new("open", "1M_families"), |b| {
        // Dropping a million families is not part of recovery.
        b.iter_with_large_drop(|| engine(Durability::Sync, &dir))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, durable_redeem, recovery);
criterion_main!(benches);
