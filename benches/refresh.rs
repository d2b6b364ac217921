//! Redeem on the rotate path: 1K and 1M live families, 1 and 2 threads.
//!
//! Each measured operation redeems the current token of a randomly chosen
//! family (so the table is hit at random, as in production) and keeps the
//! successor. With 2 threads each thread owns half the families, so no
//! redemption is a reuse; the time is wall-clock for all operations, so
//! ns/op is the inverse of aggregate throughput.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use refresh_guard::{Engine, IssueRequest, PolicySet, Token};

const CLIENT: &str = "bench-client";

fn engine_with(n: usize) -> (Engine, Vec<Token>) {
    let engine = Engine::builder()
        .policies(PolicySet::default())
        .build()
        .expect("engine");
    let ip: IpAddr = "10.0.0.1".parse().expect("ip");
    let tokens = (0..n)
        .map(|i| {
            let subject = format!("user-{i}");
            engine
                .issue(&IssueRequest {
                    client: CLIENT,
                    subject: &subject,
                    scope: "openid offline_access",
                    ip,
                })
                .expect("issue")
                .accepted()
                .expect("issued")
                .token
        })
        .collect();
    (engine, tokens)
}

/// xorshift64*: cheap, good enough to scatter table accesses.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn rotate_many(engine: &Engine, tokens: &mut [Token], iters: u64, seed: u64) {
    let ip: IpAddr = "10.0.0.1".parse().expect("ip");
    let mut s = seed | 1;
    let n = tokens.len() as u64;
    for _ in 0..iters {
        let i = (next(&mut s) % n) as usize;
        match engine.redeem(&tokens[i], CLIENT, ip).unwrap() {
            refresh_guard::Decision::Accept(a) => tokens[i] = a.token,
            refresh_guard::Decision::Deny(d) => panic!("bench token denied: {}", d.reason),
        }
    }
}

fn redeem(c: &mut Criterion) {
    let mut g = c.benchmark_group("redeem");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    for n in [1_000usize, 1_000_000] {
        let (engine, mut tokens) = engine_with(n);
        g.bench_with_input(BenchmarkId::new("rotate/1_thread", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                rotate_many(&engine, &mut tokens, iters, 0x9E37_79B9_7F4A_7C15);
                black_box(start.elapsed())
            })
        });
        g.bench_with_input(BenchmarkId::new("rotate/2_threads", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let (left, right) = tokens.split_at_mut(n / 2);
                let per = iters.div_ceil(2);
                let engine = &engine;
                let start = Instant::now();
                std::thread::scope(|s| {
                    s.spawn(|| rotate_many(engine, left, per, 1));
                    s.spawn(|| rotate_many(engine, right, per, 2));
                });
                start.elapsed()
            })
        });
    }
    g.finish();
}

/// The floor no design can beat here: one random lookup-and-update in a
/// hash table of the same size, plus one HMAC-SHA-256 of a token's bytes.
fn floor(c: &mut Criterion) {
    use hmac::{Hmac, Mac};
    use std::collections::HashMap;
    let mut g = c.benchmark_group("floor");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    for n in [1_000usize, 1_000_000] {
        let mut s = 0x1234_5678_9abc_def1u64;
        let mut table: HashMap<[u8; 16], [u64; 8], ahash::RandomState> = HashMap::default();
        let keys: Vec<[u8; 16]> = (0..n)
            .map(|_| {
                let mut k = [0u8; 16];
                k[..8].copy_from_slice(&next(&mut s).to_le_bytes());
                k[8..].copy_from_slice(&next(&mut s).to_le_bytes());
                table.insert(k, [0; 8]);
                k
            })
            .collect();
        let mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&[7; 32]).expect("any key length");
        let token = [b'a'; 54];
        g.bench_with_input(
            BenchmarkId::new("lookup_update_hmac/1_thread", n),
            &n,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut s = 0x9E37_79B9_7F4A_7C15u64;
                    let start = Instant::now();
                    for _ in 0..iters {
                        let k = &keys[(next(&mut s) % n as u64) as usize];
                        let mut m = mac.clone();
                        m.update(&token);
                        let tag = m.finalize().into_bytes();
                        let rec = table.get_mut(k).expect("present");
                        rec[0] = rec[0].wrapping_add(u64::from(tag[0]));
                    }
                    start.elapsed()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, redeem, floor);
criterion_main!(benches);
