//! Connection limits (README "Server", "Connections"): idle sockets, from
//! one loopback source or many (Linux routes all of 127.0.0.0/8 to `lo`),
//! cannot keep a legitimate request from either listener. Every wait is
//! bounded; only loopback addresses are used.

mod server_http;

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use server_http::*;

/// How long a request may take and still count as answered promptly.
const PROMPT: Duration = Duration::from_secs(2);

/// Opens client connections from chosen loopback source addresses.
struct Clients {
    rt: tokio::runtime::Runtime,
    /// `None`: the server reset the connection before `connect` returned.
    held: Vec<Option<TcpStream>>,
}

impl Clients {
    fn new() -> Clients {
        Clients {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            held: Vec::new(),
        }
    }

    /// A connection to `to` from 127.0.0.`host` (a socket bound before
    /// connecting, which `std` cannot do), or `None` if the server reset it
    /// before `connect` returned.
    fn connect(&self, host: u8, to: SocketAddr) -> Option<TcpStream> {
        let from = SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0));
        self.rt.block_on(async {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(from).unwrap();
            let s = tokio::time::timeout(Duration::from_secs(2), s.connect(to))
                .await
                .expect("loopback connect timed out");
            let s = match s {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("connect from {from} to {to}: {e}"),
            };
            let s = s.into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            Some(s)
        })
    }

    /// `n` idle connections from 127.0.0.`host`, kept open; their indexes.
    fn idle(&mut self, host: u8, to: SocketAddr, n: usize) -> std::ops::Range<usize> {
        let start = self.held.len();
        for _ in 0..n {
            let s = self.connect(host, to);
            self.held.push(s);
        }
        start..self.held.len()
    }

    /// How many of `range` the server has closed within `wait`.
    fn closed(&self, range: std::ops::Range<usize>, wait: Duration) -> usize {
        let until = Instant::now() + wait;
        self.held[range]
            .iter()
            .filter(|s| s.as_ref().is_none_or(|s| closed_by(s, until)))
            .count()
    }
}

/// Whether the server closes `s` (end of stream or reset) before `until`.
fn closed_by(mut s: &TcpStream, until: Instant) -> bool {
    let left = until
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// `GET /healthz` on a new connection from 127.0.0.1: the status, or what
/// went wrong, within [`PROMPT`].
fn healthz(to: SocketAddr, admin: bool) -> Result<u16, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, PROMPT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(PROMPT)).unwrap();
    let auth = if admin {
        format!("Authorization: Bearer {ADMIN}\r\n")
    } else {
        String::new()
    };
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    std::io::Write::write_all(&mut s, req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        return Err(format!("no answer after {:?}: {e}", started.elapsed()));
    }
    parse_response(&raw)
        .map(|r| r.status)
        .ok_or_else(|| format!("malformed answer after {:?}", started.elapsed()))
}

fn metric(s: &TestServer, line_start: &str) -> u64 {
    let text = s.admin("GET", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
}

/// Regression: one source could hold every public connection; with the
/// budget spent by its idle sockets, `/healthz` waited for the header
/// timeout. Now the source keeps its cap and the rest are closed at once.
#[test]
fn one_source_cannot_hold_more_than_its_cap() {
    let s = TestServer::with("per-source", |c| {
        c.max_connections = 16;
        c.max_connections_per_source = 4;
    });
    let mut clients = Clients::new();
    let first = clients.idle(2, s.addr, 4);
    let over = clients.idle(2, s.addr, 12);
    assert_eq!(healthz(s.addr, false), Ok(200));
    assert_eq!(clients.closed(over, PROMPT), 12, "over the cap: closed");
    assert_eq!(clients.closed(first, Duration::from_millis(300)), 0);
    // Another source has its own cap.
    let other = clients.idle(3, s.addr, 4);
    assert_eq!(clients.closed(other, Duration::from_millis(300)), 0);
    assert_eq!(
        metric(
            &s,
            "refresh_guard_http_connections_refused_total{listener=\"public\",reason=\"per_source_cap\"}"
        ),
        12
    );
}

/// Regression (of the cap above): a trusted proxy's connections carry
/// many clients, so its address is not capped.
#[test]
fn trusted_proxies_are_exempt_from_the_per_source_cap() {
    let s = TestServer::with("per-source-proxy", |c| {
        c.max_connections_per_source = 2;
        c.trusted_proxies = vec!["127.0.0.2".parse().unwrap()];
    });
    let mut clients = Clients::new();
    let proxy = clients.idle(2, s.addr, 6);
    let other = clients.idle(3, s.addr, 3);
    assert_eq!(clients.closed(proxy, Duration::from_millis(500)), 0);
    assert_eq!(clients.closed(other, PROMPT), 1);
}

/// A `GET` on a keep-alive connection: the status, once the whole
/// response (headers and `Content-Length` body) is in.
fn keep_alive_get(s: &mut TcpStream, path: &str) -> u16 {
    std::io::Write::write_all(
        s,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .unwrap();
    s.set_read_timeout(Some(PROMPT)).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("a response");
        assert!(n > 0, "closed before the response was complete");
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let r = parse_response(&raw[..end + 4]).unwrap();
        let len: usize = r.header("content-length").unwrap().parse().unwrap();
        if raw.len() >= end + 4 + len {
            return r.status;
        }
    }
}

/// Regression: a connection that never sent a request held its slot for
/// the whole header timeout (10 s). It is now closed at the first-request
/// deadline, and so is one that sends only part of its request line; a
/// keep-alive connection that has had a request is not.
#[test]
fn a_connection_without_a_request_is_closed_at_the_first_request_deadline() {
    let s = TestServer::with("first-request", |c| {
        c.first_request_timeout = Duration::from_millis(600);
    });
    let mut clients = Clients::new();
    let silent = clients.idle(2, s.addr, 1);
    let partial = clients.idle(3, s.addr, 1);
    std::io::Write::write_all(
        clients.held[partial.start].as_mut().unwrap(),
        b"GET /healthz HT",
    )
    .unwrap();
    let mut kept = clients.connect(4, s.addr).unwrap();
    assert_eq!(keep_alive_get(&mut kept, "/healthz"), 200);
    assert_eq!(
        clients.closed(silent.clone(), Duration::from_millis(200)),
        0,
        "closed before the deadline"
    );
    assert_eq!(clients.closed(silent, PROMPT), 1);
    assert_eq!(clients.closed(partial, PROMPT), 1);
    assert!(
        !closed_by(&kept, Instant::now() + Duration::from_millis(300)),
        "a keep-alive connection is held by the header timeout, not this deadline"
    );
    assert_eq!(keep_alive_get(&mut kept, "/healthz"), 200);
    assert_eq!(
        metric(
            &s,
            "refresh_guard_http_connections_closed_total{listener=\"public\",reason=\"first_request_timeout\"}"
        ),
        2
    );
}

/// Regression: idle sockets from many sources, each within its per-source
/// cap, held every slot, and `/healthz` waited in the accept backlog until
/// the first-request deadline freed one. Now a newcomer takes the slot of
/// the oldest connection that never sent a request.
#[test]
fn idle_sockets_from_many_sources_cannot_hold_the_budget() {
    let s = TestServer::with("many-sources", |c| {
        c.max_connections = 16;
        c.max_connections_per_source = 4;
        // Only eviction may close a socket while the test counts.
        c.first_request_timeout = c.header_timeout;
    });
    let mut clients = Clients::new();
    // Six sources, four sockets each, in turn: 24 for 16 slots.
    for _ in 0..4 {
        for host in 2..8 {
            clients.idle(host, s.addr, 1);
        }
    }
    assert_eq!(healthz(s.addr, false), Ok(200));
    // The 8 over the budget, then the probe, each took the slot of the
    // oldest idle socket.
    assert_eq!(clients.closed(0..9, PROMPT), 9);
    assert_eq!(clients.closed(9..24, Duration::from_millis(300)), 0);
    assert_eq!(
        metric(
            &s,
            "refresh_guard_http_connections_closed_total{listener=\"public\",reason=\"evicted\"}"
        ),
        9
    );
}

/// Regression: the oldest connection without a request gave way first,
/// whoever held the other slots, so a flood from one source evicted a lone
/// client whose first request was still on the wire. The source holding
/// the most slots now gives way first.
#[test]
fn a_flood_from_one_source_does_not_evict_a_lone_clients_first_request() {
    let s = TestServer::with("evict-flood", |c| {
        c.max_connections = 4;
        c.max_connections_per_source = 4;
        c.first_request_timeout = c.header_timeout;
    });
    let mut clients = Clients::new();
    // Connected, its request not sent yet.
    let mut lone = clients.connect(2, s.addr).unwrap();
    let flood = clients.idle(3, s.addr, 4);
    // The flood's fourth took the slot of the flood's first.
    assert_eq!(clients.closed(flood.start..flood.start + 1, PROMPT), 1);
    assert_eq!(keep_alive_get(&mut lone, "/healthz"), 200);
    assert_eq!(
        clients.closed(flood.start + 1..flood.end, Duration::from_millis(300)),
        0
    );
}

/// A connection that has had a request gives way only after every one
/// that never sent a request.
#[test]
fn a_keep_alive_connection_gives_way_after_those_that_never_sent_a_request() {
    let s = TestServer::with("evict-order", |c| {
        c.max_connections = 4;
        c.first_request_timeout = c.header_timeout;
    });
    let mut clients = Clients::new();
    let mut kept = clients.connect(2, s.addr).unwrap();
    assert_eq!(keep_alive_get(&mut kept, "/healthz"), 200);
    let fresh = clients.idle(3, s.addr, 3);
    assert_eq!(healthz(s.addr, false), Ok(200));
    assert_eq!(clients.closed(fresh.start..fresh.start + 1, PROMPT), 1);
    assert_eq!(
        clients.closed(fresh.start + 1..fresh.end, Duration::from_millis(300)),
        0
    );
    assert_eq!(keep_alive_get(&mut kept, "/healthz"), 200);
}

/// A connection in the middle of a request never gives way: with every
/// slot mid-request, a newcomer waits until one is free.
#[test]
fn a_connection_mid_request_is_not_evicted() {
    let s = TestServer::with("evict-busy", |c| {
        c.max_connections = 1;
        c.body_timeout = Duration::from_millis(800);
    });
    let clients = Clients::new();
    let mut slow = clients.connect(2, s.addr).unwrap();
    std::io::Write::write_all(
        &mut slow,
        b"POST /oauth2/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ngrant_type=",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    assert_eq!(healthz(s.addr, false), Ok(200));
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "answered after {:?}, while the only slot was mid-request",
        started.elapsed()
    );
    slow.set_read_timeout(Some(PROMPT)).unwrap();
    assert_eq!(read_response(&mut slow).status, 408);
}

/// Regression: 64 idle sockets on the admin port held all of its slots and
/// an authenticated request waited 9 s. They now give way to it, and one
/// source holds at most its cap there too.
#[test]
fn admin_answers_while_its_port_holds_idle_sockets() {
    let s = TestServer::with("admin-idle", |c| {
        c.admin_max_connections = 8;
        c.admin_max_connections_per_source = 2;
        c.first_request_timeout = c.header_timeout;
    });
    let mut clients = Clients::new();
    // Four sources fill the 8 slots, two each; a fifth gets 2 by taking
    // the oldest of the sources holding the most (all tied: host 2's first,
    // then host 3's first of the three left with two), and is refused 3
    // over its cap; the probe takes the oldest of those still holding two
    // (host 4's first).
    let oldest = clients.idle(2, s.admin, 2);
    let next = clients.idle(3, s.admin, 1);
    let third = clients.idle(3, s.admin, 1);
    let fourth = clients.idle(4, s.admin, 2);
    let fifth_host = clients.idle(5, s.admin, 2);
    let sixth = clients.idle(6, s.admin, 5);
    assert_eq!(healthz(s.admin, true), Ok(200));
    assert_eq!(clients.closed(sixth, PROMPT), 3, "over the cap");
    assert_eq!(clients.closed(oldest.start..oldest.start + 1, PROMPT), 1);
    assert_eq!(clients.closed(next, PROMPT), 1);
    assert_eq!(clients.closed(fourth.start..fourth.start + 1, PROMPT), 1);
    let quiet = Duration::from_millis(300);
    assert_eq!(clients.closed(oldest.start + 1..oldest.end, quiet), 0);
    assert_eq!(clients.closed(third, quiet), 0);
    assert_eq!(clients.closed(fourth.start + 1..fourth.end, quiet), 0);
    assert_eq!(clients.closed(fifth_host, quiet), 0);
    let text = s.admin("GET", "/metrics", None).text();
    for want in [
        "refresh_guard_http_connections_refused_total{listener=\"admin\",reason=\"per_source_cap\"} 3",
        "refresh_guard_http_connections_closed_total{listener=\"admin\",reason=\"evicted\"} 3",
    ] {
        assert!(text.contains(want), "{want} not in\n{text}");
    }
}

/// The admin listener has a budget of its own: a public listener full of
/// idle sockets does not slow it.
#[test]
fn admin_answers_while_the_public_listener_is_flooded() {
    let s = TestServer::with("admin-public-flood", |c| {
        c.max_connections = 16;
        c.max_connections_per_source = 4;
    });
    let mut clients = Clients::new();
    for host in 2..8 {
        clients.idle(host, s.addr, 4);
    }
    let started = Instant::now();
    assert_eq!(healthz(s.admin, true), Ok(200));
    assert!(started.elapsed() < PROMPT);
}

/// Regression: an unauthenticated admin request left its connection open
/// (keep-alive) after the 401, holding one of the listener's few slots.
#[test]
fn an_unauthenticated_admin_request_does_not_keep_its_connection() {
    let s = TestServer::start("admin-401");
    let clients = Clients::new();
    let mut c = clients.connect(2, s.admin).unwrap();
    std::io::Write::write_all(&mut c, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    c.set_read_timeout(Some(PROMPT)).unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw)
        .expect("the 401, then the close, without waiting for a timeout");
    let r = parse_response(&raw).unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.header("connection"), Some("close"));
}

/// `refresh-guard serve` under a soft open-file limit of 256, on ephemeral
/// ports; killed when dropped.
#[cfg(target_os = "linux")]
struct LimitedProcess {
    child: std::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
    _dir: TempDir,
}

#[cfg(target_os = "linux")]
impl LimitedProcess {
    fn start() -> LimitedProcess {
        use std::io::BufRead;
        let dir = TempDir::new("fd-limit");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "ulimit -Sn 256 && exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_refresh-guard"))
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen"])
            .args(["127.0.0.1:0", "--durability", "none", "--workers", "2"])
            .arg("--data")
            .arg(dir.path())
            .arg("--policies")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"))
            .env("REFRESH_GUARD_ADMIN_TOKEN", ADMIN)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start refresh-guard serve");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let listening = loop {
            let line = lines.next().expect("a \"listening\" log line").unwrap();
            let j: serde_json::Value = serde_json::from_str(&line).unwrap();
            if j["message"] == "listening" {
                break j;
            }
        };
        // Keep reading, so that logging never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        LimitedProcess {
            child,
            addr: listening["addr"].as_str().unwrap().parse().unwrap(),
            admin: listening["admin_addr"].as_str().unwrap().parse().unwrap(),
            _dir: dir,
        }
    }
}

#[cfg(target_os = "linux")]
impl Drop for LimitedProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Regression: with the default budgets above the process's open-file
/// limit, idle sockets ran it out of descriptors before the budget was
/// spent, so no idle connection gave way and the admin listener could not
/// accept either. The budgets now fit the limit.
#[cfg(target_os = "linux")]
#[test]
fn budgets_fit_the_open_file_limit() {
    let p = LimitedProcess::start();
    let mut clients = Clients::new();
    for host in 2..12 {
        clients.idle(host, p.addr, 30);
    }
    assert_eq!(healthz(p.addr, false), Ok(200));
    assert_eq!(healthz(p.admin, true), Ok(200));
}
