//! How long a legitimate `GET /healthz` takes while idle sockets hold the
//! server's connections: the measurement behind the connection limits in
//! the README's "Server" section.
//!
//! Starts `refresh-guard serve` in-process with its default connection
//! settings (memory-only store, two runtime threads), opens `--idle` TCP
//! connections that never send a byte, spread over `--sources` loopback
//! addresses (127.1.x.y: Linux routes all of 127.0.0.0/8 to `lo`), then
//! times `--samples` requests from 127.0.0.1, one after another, each on a
//! new connection. Only loopback addresses are ever used.
//!
//! ```sh
//! cargo run --release --example conn_flood -- \
//!     --flood public --probe public --idle 1024 --sources 32
//! ```
//!
//! `--flood` and `--probe` are `public` or `admin` (the admin probe sends
//! the admin token). Every wait is bounded: a flood connect gives up after 250 ms,
//! a probe after 30 s.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use refresh_guard::{Durability, PolicySet};
use refresh_guard_server::{AdminToken, AdminTokenSource, Config, ServerHandle};

const ADMIN: &str = "conn-flood-admin-token-0123456789";
const MAX_IDLE: usize = 20_000;
const MAX_SOURCES: usize = 250 * 250;

struct Args {
    flood: String,
    probe: String,
    idle: usize,
    sources: usize,
    samples: usize,
    settle: Duration,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        flood: "public".into(),
        probe: "public".into(),
        idle: 1024,
        sources: 32,
        samples: 5,
        settle: Duration::from_millis(1000),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{flag}: {value:?} is not a number"))
        };
        match flag.as_str() {
            "--flood" | "--probe" if value == "public" || value == "admin" => {
                if flag == "--flood" {
                    a.flood = value;
                } else {
                    a.probe = value;
                }
            }
            "--idle" => a.idle = number()?.min(MAX_IDLE),
            "--sources" => a.sources = number()?.clamp(1, MAX_SOURCES),
            "--samples" => a.samples = number()?.clamp(1, 100),
            "--settle-ms" => a.settle = Duration::from_millis(number()?.min(60_000) as u64),
            _ => return Err(format!("unknown or bad argument {flag} {value}")),
        }
    }
    Ok(a)
}

/// The `i`th flood source: 127.1.x.y with y in 1..=250.
fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (1 + i % 250) as u8))
}

/// A connection from `from` to `to`: `Err(true)` if it timed out after
/// 250 ms (a loopback handshake takes microseconds; a SYN the kernel
/// dropped would be resent only after 1 s), `Err(false)` if it failed
/// otherwise (the server reset it before `connect` returned).
fn connect_from(
    rt: &tokio::runtime::Runtime,
    from: IpAddr,
    to: SocketAddr,
) -> Result<TcpStream, bool> {
    rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|_| false)?;
        socket.bind(SocketAddr::new(from, 0)).map_err(|_| false)?;
        let stream = tokio::time::timeout(Duration::from_millis(250), socket.connect(to))
            .await
            .map_err(|_| true)?
            .map_err(|_| false)?;
        let std = stream.into_std().map_err(|_| false)?;
        std.set_nonblocking(false).map_err(|_| false)?;
        Ok(std)
    })
}

/// Whether the server has closed `s` (EOF or reset) by now.
fn closed_by_server(s: &TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut buf = [0u8; 1];
    let closed = match (&*s).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = s.set_nonblocking(false);
    closed
}

/// One `GET /healthz`: its status and how long connect-to-response took.
fn probe(to: SocketAddr, admin: bool) -> (Option<u16>, Duration) {
    let started = Instant::now();
    let status = (|| {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(30)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        let auth = if admin {
            format!("Authorization: Bearer {ADMIN}\r\n")
        } else {
            String::new()
        };
        let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).ok()?;
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let text = String::from_utf8_lossy(&resp);
        text.split(' ').nth(1)?.parse().ok()
    })();
    (status, started.elapsed())
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let data = std::env::temp_dir().join(format!("rg-conn-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).expect("temp dir");
    let server = ServerHandle::start_with_workers(
        Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            policy_set: Some(PolicySet::default()),
            data: data.clone(),
            durability: Durability::None,
            admin_token: AdminTokenSource::Value(AdminToken::new(ADMIN).unwrap()),
            ..Config::default()
        },
        2,
    )
    .expect("server starts");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let (flood_to, probe_to) = (
        if args.flood == "admin" {
            server.admin_addr()
        } else {
            server.addr()
        },
        if args.probe == "admin" {
            server.admin_addr()
        } else {
            server.addr()
        },
    );

    let (status, quiet) = probe(probe_to, args.probe == "admin");
    println!(
        "{} /healthz before the flood: {status:?} in {quiet:.3?}",
        args.probe
    );

    let started = Instant::now();
    let mut idle = Vec::with_capacity(args.idle);
    let (mut timed_out, mut failed) = (0, 0);
    for i in 0..args.idle {
        match connect_from(&rt, source(i % args.sources), flood_to) {
            Ok(s) => idle.push(s),
            Err(true) => timed_out += 1,
            Err(false) => failed += 1,
        }
    }
    std::thread::sleep(args.settle);
    let closed = idle.iter().filter(|s| closed_by_server(s)).count();
    println!(
        "flood on {}: {} idle connections from {} sources in {:.3?}; {} connects timed out, \
         {} reset; {} closed by the server after {:?}",
        args.flood,
        idle.len(),
        args.sources,
        started.elapsed(),
        timed_out,
        failed,
        closed,
        args.settle,
    );
    // `samples` is at least 1, so `times` is never empty.
    let mut times = Vec::new();
    for n in 0..args.samples {
        let (status, took) = probe(probe_to, args.probe == "admin");
        println!("{} /healthz #{n}: {status:?} in {took:.3?}", args.probe);
        times.push(took);
    }
    let first = times[0];
    times.sort();
    println!(
        "summary: flood={} probe={} idle={} sources={} first={:.3?} median={:.3?} max={:.3?}",
        args.flood,
        args.probe,
        args.idle,
        args.sources,
        first,
        times[times.len() / 2],
        times[times.len() - 1],
    );
    drop(idle);
    let _ = server.shutdown();
    let _ = std::fs::remove_dir_all(&data);
}
