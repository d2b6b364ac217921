//! What a redemption against a shared Redis costs: (a) the engine on its
//! Redis store (`RedisStore`, with `--features redis`), beside the limit
//! (c, a no-op script), the naive store users write by hand (b, WATCH,
//! GET, decide, MULTI/SET/EXEC), and a stand-in of the store's shape (a′,
//! one compare-and-set script by EVALSHA, no engine). 64 concurrent
//! callers, a `redis-server` on loopback started by the bench itself
//! (tests/redis_support). The figures are in BENCHMARKS.md, "Redis: the
//! limit and the naive store".
//!
//! The script variants go through the client setup the store uses: one
//! multiplexed `ConnectionManager` driven by a one-worker tokio runtime,
//! each call spawned on it and answered through a oneshot the blocking
//! caller waits on. The naive variant needs a connection per caller (WATCH
//! belongs to a connection), so it has a pool of 64 blocking ones, one per
//! caller thread. Throughput is criterion's (one element = one
//! redemption, spread over the callers by `iter_custom`); p50 and p99 of
//! the per-call latencies are printed after each variant.

#[path = "../tests/redis_support/mod.rs"]
mod redis_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use redis_support::RedisServer;
use tokio::sync::oneshot;

const CALLERS: usize = 64;
/// Families per caller: callers never share one, so every figure is the
/// uncontended case (a WATCH abort or a lost compare-and-set is counted,
/// and expected to stay at zero).
const FAMILIES_PER_CALLER: usize = 256;
/// About the size of a family record (docs/design.md).
const RECORD_LEN: usize = 150;
/// The idle TTL of the default policy (README "Policy knobs"), as the
/// key's expiry.
const TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// Batches smaller than this (criterion's first warm-up rounds) keep
/// most callers idle; their latencies are left out of p50 and p99.
const MIN_RECORDED_BATCH: u64 = (CALLERS * 16) as u64;

/// The shape of the store's compare-and-set: KEYS[1] the family, ARGV[1]
/// the version decided from, ARGV[2] the new record, ARGV[3] the TTL in
/// ms; {1, version} when written, {0, version, record} when the record
/// moved on since.
const CAS: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'v', 'r')
local v = tonumber(cur[1]) or 0
if v ~= tonumber(ARGV[1]) then
  if cur[1] then return {0, v, cur[2]} end
  return {0, 0}
end
v = v + 1
redis.call('HSET', KEYS[1], 'v', v, 'r', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, v}
";

fn family_key(prefix: &str, caller: usize, family: usize) -> String {
    // The store's key shape: a prefix and the 16-byte family id in a hash
    // tag, so a family stays on one cluster slot.
    format!(
        "{prefix}:f:{{{:032x}}}",
        caller * FAMILIES_PER_CALLER + family
    )
}

/// A record of `RECORD_LEN` bytes whose first 20 are its version.
fn record(version: u64) -> Vec<u8> {
    let mut r = format!("{version:020}").into_bytes();
    r.resize(RECORD_LEN, b'x');
    r
}

/// The naive store's decision: the record's version must be the one the
/// caller's token was issued at.
fn decide(record: &[u8], presented: u64) -> u64 {
    let version: u64 = std::str::from_utf8(&record[..20])
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("a record written by this bench");
    assert_eq!(version, presented, "only this caller redeems this family");
    version + 1
}

/// Runs `iters` calls spread over the callers, each on its own named
/// thread started before the clock; returns the wall time and appends the
/// per-call latencies (ns) to `latencies` for batches large enough.
fn spread<S: Send>(
    states: &mut [S],
    iters: u64,
    latencies: &Mutex<Vec<u64>>,
    call: impl Fn(&mut S, usize) + Sync,
) -> Duration {
    let n = states.len() as u64;
    let barrier = Barrier::new(states.len() + 1);
    thread::scope(|s| {
        let handles: Vec<_> = states
            .iter_mut()
            .enumerate()
            .map(|(i, state)| {
                let count = iters / n + u64::from((i as u64) < iters % n);
                let (barrier, call) = (&barrier, &call);
                thread::Builder::new()
                    .name(format!("caller-{i}"))
                    .spawn_scoped(s, move || {
                        let mut mine = Vec::with_capacity(count as usize);
                        barrier.wait();
                        for k in 0..count as usize {
                            let t = Instant::now();
                            call(state, k);
                            mine.push(t.elapsed().as_nanos() as u64);
                        }
                        mine
                    })
                    .expect("spawn a caller thread")
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let all: Vec<Vec<u64>> = handles
            .into_iter()
            .map(|h| h.join().expect("a caller panicked"))
            .collect();
        let took = start.elapsed();
        if iters >= MIN_RECORDED_BATCH {
            latencies.lock().unwrap().extend(all.into_iter().flatten());
        }
        took
    })
}

/// redis-server's counts of commands processed and of reads from client
/// sockets: their ratio shows how many commands each read brings in.
fn io_counts(server: &RedisServer) -> (u64, u64) {
    let info = server.cmd(&["INFO", "stats"]).text().expect("INFO stats");
    let count = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.parse().ok())
            .unwrap_or_else(|| panic!("INFO stats has no {name}"))
    };
    (
        count("total_commands_processed"),
        count("total_reads_processed"),
    )
}

fn summary(
    id: &str,
    latencies: &Mutex<Vec<u64>>,
    lost: u64,
    server: &RedisServer,
    before: (u64, u64),
) {
    let mut l = std::mem::take(&mut *latencies.lock().unwrap());
    if l.is_empty() {
        return; // filtered out on the command line
    }
    l.sort_unstable();
    let at = |q: f64| l[((l.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    let after = io_counts(server);
    let (commands, reads) = (after.0 - before.0, after.1 - before.1);
    println!(
        "redis/{id}: p50 {:.1} us, p99 {:.1} us over {} redemptions by {CALLERS} callers \
         ({lost} aborted and retried); server: {:.2} commands per socket read",
        at(0.50),
        at(0.99),
        l.len(),
        commands as f64 / reads.max(1) as f64,
    );
}

/// What the store's shell is around a connection: the runtime that drives
/// it, the connection, and the scripts.
struct Shared {
    rt: tokio::runtime::Handle,
    conn: ConnectionManager,
    cas: Arc<Script>,
    noop: Arc<Script>,
}

/// One caller of the script variants: its families' current versions (the
/// engine's table, which decides before the compare-and-set).
struct ScriptCaller {
    shared: Arc<Shared>,
    index: usize,
    versions: Vec<u64>,
}

impl ScriptCaller {
    /// Spawns `op` on the runtime and blocks on its oneshot, as the store
    /// does for a blocking caller.
    fn call<T: Send + 'static>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>> + Send + 'static,
    ) -> T {
        let (tx, rx) = oneshot::channel();
        self.shared.rt.spawn(async move {
            let _ = tx.send(op.await);
        });
        rx.blocking_recv()
            .expect("the runtime answers")
            .expect("redis answers")
    }
}

/// An engine on a `RedisStore` of `server`, with the default policy.
#[cfg(feature = "redis")]
fn store_engine(server: &RedisServer) -> refresh_guard::Engine {
    let store =
        refresh_guard::RedisStore::connect(&server.url(), refresh_guard::RedisOptions::default())
            .expect("connect the store");
    refresh_guard::Engine::builder()
        .keys(refresh_guard::KeyRing::generate().expect("a key ring"))
        .shared_store(store)
        .build()
        .expect("an engine on the store")
}

fn bench(c: &mut Criterion) {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).expect("a redis url");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("redis-runtime")
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let conn = rt
        .block_on(ConnectionManager::new(client.clone()))
        .expect("connect");
    let shared = Arc::new(Shared {
        rt: rt.handle().clone(),
        conn,
        cas: Arc::new(Script::new(CAS)),
        noop: Arc::new(Script::new("return 1")),
    });

    // The families: hashes for the script, strings for the naive store.
    let mut setup = client.get_connection().expect("connect");
    for caller in 0..CALLERS {
        let mut p = redis::pipe();
        for f in 0..FAMILIES_PER_CALLER {
            p.cmd("HSET")
                .arg(family_key("cas", caller, f))
                .arg("v")
                .arg(1)
                .arg("r")
                .arg(record(1))
                .ignore();
            p.cmd("SET")
                .arg(family_key("naive", caller, f))
                .arg(record(1))
                .arg("PX")
                .arg(TTL_MS)
                .ignore();
        }
        p.exec(&mut setup).expect("populate");
    }

    let mut g = c.benchmark_group("redis_64_callers");
    g.throughput(Throughput::Elements(1))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(3))
        .measurement_time(Duration::from_secs(12));
    let latencies = Mutex::new(Vec::new());
    let mut callers: Vec<ScriptCaller> = (0..CALLERS)
        .map(|index| ScriptCaller {
            shared: shared.clone(),
            index,
            versions: vec![1; FAMILIES_PER_CALLER],
        })
        .collect();

    // (c) The limit: a script that does nothing, by EVALSHA.
    let before = io_counts(&server);
    g.bench_function("c_noop_script_evalsha", |b| {
        b.iter_custom(|iters| {
            spread(&mut callers, iters, &latencies, |caller, _| {
                let (mut conn, script) = (caller.shared.conn.clone(), caller.shared.noop.clone());
                let one: i64 = caller.call(async move { script.invoke_async(&mut conn).await });
                assert_eq!(one, 1);
            })
        })
    });
    summary("c_noop_script_evalsha", &latencies, 0, &server, before);

    // (a) The engine on its Redis store: a rotation per redemption, each
    // caller on its own families, every record in the engine's cache (so
    // one compare-and-set script per redemption, as (a') sends).
    #[cfg(feature = "redis")]
    {
        let engine = store_engine(&server);
        let mut tokens: Vec<(usize, Vec<refresh_guard::Token>)> = (0..CALLERS)
            .map(|i| (i, Vec::with_capacity(FAMILIES_PER_CALLER)))
            .collect();
        thread::scope(|s| {
            for (i, mine) in tokens.iter_mut() {
                let engine = &engine;
                s.spawn(move || {
                    for f in 0..FAMILIES_PER_CALLER {
                        let req = refresh_guard::IssueRequest {
                            client: "bench-app",
                            subject: &format!("user-{i}-{f}"),
                            scope: "openid",
                            ip: None,
                        };
                        let d = engine.issue(&req).expect("issue on the store");
                        mine.push(d.accepted().expect("issued").token);
                    }
                });
            }
        });
        let before = io_counts(&server);
        g.bench_function("a_engine_redis_store", |b| {
            b.iter_custom(|iters| {
                spread(&mut tokens, iters, &latencies, |(_, mine), k| {
                    let f = k % FAMILIES_PER_CALLER;
                    let req = refresh_guard::RedeemRequest::new(mine[f].as_str(), "bench-app");
                    match engine.redeem(&req).expect("the store answers") {
                        refresh_guard::Decision::Accept(a) => mine[f] = a.token,
                        other => panic!("an unshared family was denied: {other:?}"),
                    }
                })
            })
        });
        summary("a_engine_redis_store", &latencies, 0, &server, before);
    }

    // (a') The store's shape: one compare-and-set script per redemption.
    let before = io_counts(&server);
    g.bench_function("a_prime_cas_script_evalsha", |b| {
        b.iter_custom(|iters| {
            spread(&mut callers, iters, &latencies, |caller, k| {
                let f = k % FAMILIES_PER_CALLER;
                let decided = caller.versions[f];
                let key = family_key("cas", caller.index, f);
                let (mut conn, script) = (caller.shared.conn.clone(), caller.shared.cas.clone());
                let answer: Vec<Value> = caller.call(async move {
                    script
                        .key(key)
                        .arg(decided)
                        .arg(record(decided + 1))
                        .arg(TTL_MS)
                        .invoke_async(&mut conn)
                        .await
                });
                match answer.as_slice() {
                    [Value::Int(1), Value::Int(v)] => caller.versions[f] = *v as u64,
                    other => panic!("the compare-and-set lost on an unshared family: {other:?}"),
                }
            })
        })
    });
    summary("a_prime_cas_script_evalsha", &latencies, 0, &server, before);

    // (b) The naive store: WATCH, GET, decide in Rust, MULTI SET EXEC,
    // again on an abort. Written out rather than with redis-rs's
    // `transaction` helper, which adds an UNWATCH round trip after EXEC.
    let aborts = AtomicU64::new(0);
    let mut naive: Vec<(usize, redis::Connection, Vec<u64>)> = (0..CALLERS)
        .map(|i| {
            let conn = client.get_connection().expect("a pooled connection");
            (i, conn, vec![1; FAMILIES_PER_CALLER])
        })
        .collect();
    let before = io_counts(&server);
    g.bench_function("b_naive_watch_get_multi_exec", |b| {
        b.iter_custom(|iters| {
            spread(
                &mut naive,
                iters,
                &latencies,
                |(index, conn, versions), k| {
                    let f = k % FAMILIES_PER_CALLER;
                    let key = family_key("naive", *index, f);
                    loop {
                        redis::cmd("WATCH").arg(&key).exec(conn).expect("WATCH");
                        let current: Vec<u8> =
                            redis::cmd("GET").arg(&key).query(conn).expect("GET");
                        let next = decide(&current, versions[f]);
                        let done: Option<Vec<String>> = redis::pipe()
                            .atomic()
                            .cmd("SET")
                            .arg(&key)
                            .arg(record(next))
                            .arg("PX")
                            .arg(TTL_MS)
                            .query(conn)
                            .expect("MULTI/EXEC");
                        if done.is_some() {
                            versions[f] = next;
                            break;
                        }
                        aborts.fetch_add(1, Ordering::Relaxed);
                    }
                },
            )
        })
    });
    summary(
        "b_naive_watch_get_multi_exec",
        &latencies,
        aborts.load(Ordering::Relaxed),
        &server,
        before,
    );
    g.finish();
    drop(callers);
    drop(shared);
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(server);
}

criterion_group!(benches, bench);
criterion_main!(benches);
