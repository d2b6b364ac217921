//! Refresh grants per second through `refresh-guard serve` over HTTP/1.1
//! keep-alive on loopback: 64 connections, each refreshing its own token
//! family in a loop (every response's refresh token is the next request's),
//! with the store in `none` and `sync` durability. Prints throughput and
//! p50/p99 latency, and whether the issue's targets are met.
//!
//! The load generator (hyper's HTTP/1.1 client on one thread) runs in the
//! same process and on the same cores as the server (two runtime threads):
//! its cost is included, as the target asks.
//!
//! `cargo bench --bench http`; `RG_BENCH_SECS` sets the measured seconds
//! per mode (default 10), `RG_BENCH_CONNECTIONS` the connections (64).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use refresh_guard::{Durability, IssueRequest, PolicySet};
use refresh_guard_server::{AdminToken, AdminTokenSource, Config, ServerHandle};

const CLIENT: &str = "bench-app";

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

/// One connection: refresh its family until `end`, recording latencies
/// after `measure_from`.
async fn connection(
    addr: SocketAddr,
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
        let body = format!("grant_type=refresh_token&refresh_token={token}&client_id={CLIENT}");
        let req = hyper::Request::post("/oauth2/token")
            .header("host", &host)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        sender.ready().await.expect("connection ready");
        let resp = sender.send_request(req).await.expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        let text = std::str::from_utf8(&bytes).expect("utf-8");
        let key = "\"refresh_token\":\"";
        let start = text.find(key).expect("refresh_token in response") + key.len();
        let len = text[start..].find('"').expect("closing quote");
        token = text[start..start + len].to_owned();
        if now >= measure_from {
            latencies.push(now.elapsed());
        }
    }
    latencies
}

fn run(mode: &str, durability: Durability, connections: usize, secs: u64) -> Outcome {
    let dir: PathBuf = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-http-{mode}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = ServerHandle::start_with_workers(
        Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            policy_set: Some(PolicySet::default()),
            data: dir.clone(),
            durability,
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
                    client: CLIENT,
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
            .map(|t| tokio::spawn(connection(addr, t, measure_from, end)))
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

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects modes.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let secs = env_or("RG_BENCH_SECS", 10);
    let connections = env_or("RG_BENCH_CONNECTIONS", 64) as usize;
    println!(
        "refresh grants over HTTP/1.1 keep-alive, {connections} connections, loopback, {secs} s per mode"
    );
    println!(
        "{:<6} {:>12} {:>14} {:>10} {:>10}  target",
        "mode", "grants", "grants/s", "p50", "p99"
    );
    for (mode, durability, target) in [
        ("none", Durability::None, 20_000.0),
        ("sync", Durability::Sync, 8_000.0),
    ] {
        if !filter.is_empty() && !filter.iter().any(|f| mode.contains(f.as_str())) {
            continue;
        }
        let mut o = run(mode, durability, connections, secs);
        o.latencies.sort();
        let rate = o.grants as f64 / o.elapsed.as_secs_f64();
        println!(
            "{mode:<6} {:>12} {:>14.0} {:>8.2}ms {:>8.2}ms  >= {target:.0}/s: {}",
            o.grants,
            rate,
            percentile(&o.latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&o.latencies, 0.99).as_secs_f64() * 1e3,
            if rate >= target { "met" } else { "NOT met" }
        );
    }
}
