//! Requests per second through `refresh-guard serve` over HTTP/1.1
//! keep-alive on loopback, 64 connections, one load generator, five modes:
//!
//! - `healthz`: `GET /healthz`, the floor: what the HTTP stack, the
//!   runtime and the generator cost with no token work at all;
//! - `jwt-none`, `opaque-none`: refresh grants (each connection refreshes
//!   its own family in a loop, every response's refresh token the next
//!   request's) with RFC 9068 JWT or opaque access tokens, `none`
//!   durability;
//! - `jwt-sync`, `opaque-sync`: the same, `sync` durability.
//!
//! Prints throughput and p50/p99 latency per run, then the median of the
//! runs per mode and opaque/floor against the 0.8x target.
//!
//! The load generator (hyper's HTTP/1.1 client on one thread) runs in the
//! same process and on the same cores as the server (two runtime threads):
//! its cost is included in every mode, the floor's too.
//!
//! Build with `cargo build --profile bench -p refresh-guard-server --bench
//! http` and run the binary, or `cargo bench --bench http`;
//! `RG_BENCH_SECS` sets the measured seconds per run (default 10),
//! `RG_BENCH_RUNS` the runs, interleaved mode by mode (default 3),
//! `RG_BENCH_CONNECTIONS` the connections (64); an argument selects the
//! modes whose name contains it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use refresh_guard::{AccessTokenFormat, Durability, IssueRequest, PolicyOverrides, PolicySet};
use refresh_guard_server::{AdminToken, AdminTokenSource, Config, ServerHandle};

const CLIENT: &str = "bench-app";
const OPAQUE: &str = "bench-opaque";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Outcome {
    grants: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// What a connection asks, over and over.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// `GET /healthz`.
    Health,
    /// The refresh grant of `client`.
    Refresh { client: &'static str },
}

/// One connection: ask until `end`, recording latencies after
/// `measure_from`. A refresh uses each response's refresh token next.
async fn connection(
    addr: SocketAddr,
    load: Load,
    mut token: String,
    measure_from: Instant,
    end: Instant,
) -> Vec<Duration> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut latencies = Vec::with_capacity(1 << 16);
    let host = addr.to_string();
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let req = match load {
            Load::Health => hyper::Request::get("/healthz")
                .header("host", &host)
                .body(Full::new(Bytes::new())),
            Load::Refresh { client } => {
                let body =
                    format!("grant_type=refresh_token&refresh_token={token}&client_id={client}");
                hyper::Request::post("/oauth2/token")
                    .header("host", &host)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from(body)))
            }
        }
        .expect("request");
        sender.ready().await.expect("connection ready");
        let resp = sender.send_request(req).await.expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        if load != Load::Health {
            let text = std::str::from_utf8(&bytes).expect("utf-8");
            let key = "\"refresh_token\":\"";
            let start = text.find(key).expect("refresh_token in response") + key.len();
            let len = text[start..].find('"').expect("closing quote");
            token = text[start..start + len].to_owned();
        }
        if now >= measure_from {
            latencies.push(now.elapsed());
        }
    }
    latencies
}

/// The bench's clients: `bench-app` mints JWTs (the default),
/// `bench-opaque` opaque tokens.
fn policies() -> PolicySet {
    PolicySet::builder()
        .client(
            OPAQUE,
            PolicyOverrides::new().access_token_format(AccessTokenFormat::Opaque),
        )
        .build()
        .expect("bench policies")
}

fn run(mode: &str, load: Load, durability: Durability, connections: usize, secs: u64) -> Outcome {
    let dir: PathBuf = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-http-{mode}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = ServerHandle::start_with_workers(
        Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            policy_set: Some(policies()),
            data: dir.clone(),
            durability,
            // Every connection comes from 127.0.0.1: the per-source cap
            // (32 by default) would reset half of them at connect.
            max_connections_per_source: connections,
            admin_token: AdminTokenSource::Value(
                AdminToken::new("bench-admin-token-0123456789").expect("token"),
            ),
            ..Config::default()
        },
        2,
    )
    .expect("server starts");
    let ip = Some("127.0.0.1".parse().expect("ip"));
    let tokens: Vec<String> = (0..connections)
        .map(|i| {
            let subject = format!("user-{i}");
            let d = server
                .engine()
                .issue(&IssueRequest {
                    client: match load {
                        Load::Refresh { client } => client,
                        Load::Health => CLIENT,
                    },
                    subject: &subject,
                    scope: "openid offline_access",
                    ip,
                })
                .expect("issue");
            d.accepted().expect("issued").token.to_string()
        })
        .collect();
    let addr = server.addr();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let warmup = Duration::from_secs(2);
    let outcome = rt.block_on(async {
        let start = Instant::now();
        let measure_from = start + warmup;
        let end = measure_from + Duration::from_secs(secs);
        let tasks: Vec<_> = tokens
            .into_iter()
            .map(|t| tokio::spawn(connection(addr, load, t, measure_from, end)))
            .collect();
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await.expect("connection task"));
        }
        Outcome {
            grants: latencies.len() as u64,
            elapsed: end - measure_from,
            latencies,
        }
    });
    server.shutdown().expect("shutdown");
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects modes.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let secs = env_or("RG_BENCH_SECS", 10);
    let runs = env_or("RG_BENCH_RUNS", 3).max(1);
    let connections = env_or("RG_BENCH_CONNECTIONS", 64) as usize;
    let modes = [
        ("healthz", Load::Health, Durability::None),
        (
            "jwt-none",
            Load::Refresh { client: CLIENT },
            Durability::None,
        ),
        (
            "opaque-none",
            Load::Refresh { client: OPAQUE },
            Durability::None,
        ),
        (
            "jwt-sync",
            Load::Refresh { client: CLIENT },
            Durability::Sync,
        ),
        (
            "opaque-sync",
            Load::Refresh { client: OPAQUE },
            Durability::Sync,
        ),
    ];
    let modes: Vec<_> = modes
        .into_iter()
        .filter(|(m, _, _)| filter.is_empty() || filter.iter().any(|f| m.contains(f.as_str())))
        .collect();
    println!(
        "HTTP/1.1 keep-alive, {connections} connections, loopback, {secs} s per run, {runs} runs interleaved"
    );
    println!(
        "{:<4} {:<12} {:>10} {:>12} {:>9} {:>9}",
        "run", "mode", "requests", "requests/s", "p50", "p99"
    );
    // (rate, p50, p99) per run, per mode.
    let mut results: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); modes.len()];
    for run_no in 1..=runs {
        for (i, (mode, load, durability)) in modes.iter().enumerate() {
            let mut o = run(mode, *load, *durability, connections, secs);
            o.latencies.sort();
            let rate = o.grants as f64 / o.elapsed.as_secs_f64();
            let p50 = percentile(&o.latencies, 0.50).as_secs_f64() * 1e3;
            let p99 = percentile(&o.latencies, 0.99).as_secs_f64() * 1e3;
            println!(
                "{run_no:<4} {mode:<12} {:>10} {rate:>12.0} {p50:>7.2}ms {p99:>7.2}ms",
                o.grants
            );
            results[i].push((rate, p50, p99));
        }
    }
    println!("\nmedians of {runs} runs");
    println!("| mode | requests/s | p50 | p99 | / floor |");
    println!("|---|---|---|---|---|");
    let floor = modes
        .iter()
        .position(|(m, _, _)| *m == "healthz")
        .map(|i| median(results[i].iter().map(|r| r.0).collect()));
    let mut opaque_ratio = None;
    for (i, (mode, _, _)) in modes.iter().enumerate() {
        let rate = median(results[i].iter().map(|r| r.0).collect());
        let p50 = median(results[i].iter().map(|r| r.1).collect());
        let p99 = median(results[i].iter().map(|r| r.2).collect());
        let ratio = floor.map(|f| rate / f);
        if *mode == "opaque-none" {
            opaque_ratio = ratio;
        }
        println!(
            "| `{mode}` | {:.1} K | {p50:.2} ms | {p99:.2} ms | {} |",
            rate / 1e3,
            ratio.map_or_else(|| "—".to_owned(), |r| format!("{r:.2}×"))
        );
    }
    if let Some(r) = opaque_ratio {
        println!(
            "\nopaque refresh grants (none) / floor = {r:.2}: target >= 0.80 {}",
            if r >= 0.8 { "met" } else { "NOT met" }
        );
    }
}
