//! Policy machinery on the hot path: allow-list lookups by list size,
//! redemption while another thread swaps the policy set, and the cost of a
//! shadow candidate.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use refresh_guard::RedeemRequest;
use refresh_guard::{
    AllowList, Decision, Engine, IpRange, IssueRequest, PolicyOverrides, PolicySet, Token,
};

fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// `n` random /24 (IPv4) or /48 (IPv6) networks, and probe addresses inside
/// them (hits) and outside every one (misses).
fn lists(n: usize, v6: bool) -> (AllowList, Vec<IpAddr>, Vec<IpAddr>) {
    let mut s = 0xDEAD_BEEF_u64 ^ n as u64;
    let mut ranges = Vec::with_capacity(n);
    let mut hits = Vec::new();
    for _ in 0..n {
        let r = next(&mut s);
        if v6 {
            // 2001:db8:xxxx::/48 keeps every network inside 2001:db8::/32.
            let net = Ipv6Addr::new(0x2001, 0x0db8, (r & 0xffff) as u16, 0, 0, 0, 0, 0);
            ranges.push(format!("{net}/48").parse::<IpRange>().expect("cidr"));
            hits.push(IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0x0db8,
                (r & 0xffff) as u16,
                1,
                0,
                0,
                0,
                (r >> 16) as u16,
            )));
        } else {
            // 10.x.y.0/24 keeps every network inside 10.0.0.0/8.
            let net = Ipv4Addr::new(10, (r >> 8) as u8, r as u8, 0);
            ranges.push(format!("{net}/24").parse::<IpRange>().expect("cidr"));
            hits.push(IpAddr::V4(Ipv4Addr::new(
                10,
                (r >> 8) as u8,
                r as u8,
                (r >> 16) as u8,
            )));
        }
    }
    let misses = (0..1024)
        .map(|_| {
            let r = next(&mut s);
            if v6 {
                IpAddr::V6(Ipv6Addr::new(0x2001, 0x0db9, r as u16, 0, 0, 0, 0, 1))
            } else {
                IpAddr::V4(Ipv4Addr::new(192, 168, (r >> 8) as u8, r as u8))
            }
        })
        .collect();
    (AllowList::new(&ranges), hits, misses)
}

fn allowlist(c: &mut Criterion) {
    let mut g = c.benchmark_group("allowlist");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(3));
    for v6 in [false, true] {
        let fam = if v6 { "ipv6" } else { "ipv4" };
        for n in [1usize, 16, 1_000, 10_000] {
            let (list, hits, misses) = lists(n, v6);
            for (kind, probes) in [("hit", &hits), ("miss", &misses)] {
                let id = BenchmarkId::new(format!("{fam}/{kind}"), n);
                g.bench_with_input(id, &n, |b, _| {
                    let mut i = 0usize;
                    b.iter(|| {
                        i = (i + 1) % probes.len();
                        black_box(list.contains(probes[i]))
                    })
                });
            }
        }
    }
    g.finish();
}

const CLIENT: &str = "bench";

fn engine_with(n: usize, set: PolicySet) -> (Engine, Vec<Token>) {
    let e = Engine::builder().policies(set).build().expect("engine");
    let ip: IpAddr = "10.0.0.1".parse().expect("ip");
    let tokens = (0..n)
        .map(|i| {
            e.issue(&IssueRequest {
                client: CLIENT,
                subject: &format!("user-{i}"),
                scope: "openid",
                ip: Some(ip),
            })
            .expect("issue")
            .accepted()
            .expect("issued")
            .token
        })
        .collect();
    (e, tokens)
}

fn rotate(e: &Engine, tokens: &mut [Token], iters: u64, seed: u64) -> Duration {
    let ip: IpAddr = "10.0.0.1".parse().expect("ip");
    let mut s = seed | 1;
    let start = Instant::now();
    for _ in 0..iters {
        let i = (next(&mut s) % tokens.len() as u64) as usize;
        match e
            .redeem(&RedeemRequest::new(&tokens[i], CLIENT).ip(ip))
            .expect("no store")
        {
            Decision::Accept(a) => tokens[i] = a.token,
            Decision::Deny(d) => panic!("denied: {}", d.reason),
        }
    }
    start.elapsed()
}

fn set(grace: u64) -> PolicySet {
    PolicySet::builder()
        .client(
            CLIENT,
            PolicyOverrides::new()
                .grace_period(Duration::from_secs(grace))
                .ip_allowlist(vec!["10.0.0.0/8".parse().expect("cidr")]),
        )
        .build()
        .expect("set")
}

/// Redemption throughput, alone and while another thread swaps the policy
/// set 100 times a second.
fn policy_swap(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_swap");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    let (e, mut tokens) = engine_with(100_000, set(10));
    g.bench_function(BenchmarkId::new("rotate", "no_swaps"), |b| {
        b.iter_custom(|iters| rotate(&e, &mut tokens, iters, 7))
    });
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let sets = [set(10), set(20)];
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                e.swap_policies(sets[i % 2].clone());
                i += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        g.bench_function(BenchmarkId::new("rotate", "swaps_100_per_s"), |b| {
            b.iter_custom(|iters| rotate(&e, &mut tokens, iters, 9))
        });
        stop.store(true, Ordering::Relaxed);
    });
    g.finish();
}

/// Redemption with and without a shadow candidate set.
fn shadow(c: &mut Criterion) {
    let mut g = c.benchmark_group("shadow");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    let (e, mut tokens) = engine_with(1_000, set(10));
    g.bench_function(BenchmarkId::new("rotate", "no_shadow"), |b| {
        b.iter_custom(|iters| rotate(&e, &mut tokens, iters, 11))
    });
    e.set_shadow(set(0));
    g.bench_function(BenchmarkId::new("rotate", "with_shadow"), |b| {
        b.iter_custom(|iters| rotate(&e, &mut tokens, iters, 13))
    });
    g.finish();
}

criterion_group!(benches, allowlist, policy_swap, shadow);
criterion_main!(benches);
