//! The `refresh-guard serve` binary as an operator runs it: killed with
//! SIGKILL in the middle of traffic and started again on the same data
//! directory, stopped with SIGTERM, reloaded with SIGHUP.
#![cfg(unix)]

mod server_http;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use server_http::*;

/// A running `refresh-guard serve` process and its log lines.
struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every log line so far.
    log: Arc<Mutex<Vec<String>>>,
    server: TestServer,
}

impl Process {
    /// Start the binary on `data` and `policies`, on ephemeral ports, and
    /// wait for its "listening" log line to learn them.
    fn start(data: &Path, policies: &Path) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_refresh-guard"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .arg("--data")
            .arg(data)
            .arg("--policies")
            .arg(policies)
            .args(["--durability", "sync", "--workers", "2"])
            .env("REFRESH_GUARD_ADMIN_TOKEN", ADMIN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start refresh-guard serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let listening = wait_for(&lines, "listening");
        let j: serde_json::Value = serde_json::from_str(&listening).expect("JSON log line");
        let addr: SocketAddr = j["addr"].as_str().unwrap().parse().unwrap();
        let admin: SocketAddr = j["admin_addr"].as_str().unwrap().parse().unwrap();
        Process {
            child,
            lines,
            log,
            server: TestServer {
                server: None,
                addr,
                admin,
                dir: TempDir::new("unused"),
            },
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(ok.success());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first log line whose message is `message`, within 60 s; every line
/// before it must be JSON (stdout is not a terminal).
fn wait_for(lines: &mpsc::Receiver<String>, message: &str) -> String {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no {message:?} log line within 60 s"));
        let j: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        if j["message"] == message {
            return line;
        }
    }
}

fn policies_with(dir: &Path, text: &str) {
    std::fs::write(dir.join("policies.toml"), text).unwrap();
}

fn token(r: &Resp) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["refresh_token"].as_str().unwrap().to_owned()
}

/// SIGKILL while 8 clients refresh in a loop, then a restart on the same
/// data directory: every token a client received still works, and tokens
/// rotated out before the crash are reuse. (`sync` durability: a rotation
/// is answered only once durable.)
#[test]
fn sigkill_mid_traffic_then_restart_keeps_every_acknowledged_rotation() {
    let data = TempDir::new("restart-data");
    let policies = TempDir::new("restart-policies");
    // The longest grace: a client whose request was in flight at the kill
    // holds the predecessor of a rotation that may or may not have become
    // durable; within grace it works either way.
    policies_with(policies.path(), "[defaults]\ngrace_period = \"5m\"\n");
    let p = Process::start(data.path(), policies.path());

    // Quiet families: rotated five times, then left alone.
    let quiet: Vec<Vec<String>> = (0..8)
        .map(|i| {
            let mut chain = vec![p.server.family("spa", &format!("quiet-{i}"), "openid")];
            for _ in 0..5 {
                let next = token(&p.server.refresh("spa", chain.last().unwrap()));
                chain.push(next);
            }
            chain
        })
        .collect();

    // Busy families: refreshed in a loop until the server dies. Each thread
    // returns its chain of acknowledged tokens.
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..8)
        .map(|i| {
            let first = p.server.family("spa", &format!("busy-{i}"), "openid");
            let addr = p.server.addr;
            let stop = stop.clone();
            thread::spawn(move || {
                let mut chain = vec![first];
                while !stop.load(Ordering::Relaxed) {
                    let body = format!(
                        "grant_type=refresh_token&refresh_token={}&client_id=spa",
                        chain.last().unwrap()
                    );
                    match try_request(
                        addr,
                        "POST",
                        "/oauth2/token",
                        &[("Content-Type", "application/x-www-form-urlencoded")],
                        body.as_bytes(),
                    ) {
                        Ok(r) => chain.push(token(&r)),
                        Err(_) => break, // the server is gone
                    }
                }
                chain
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(1500));
    p.signal("KILL");
    let busy: Vec<Vec<String>> = busy.into_iter().map(|t| t.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    for chain in &busy {
        assert!(
            chain.len() >= 3,
            "too little traffic before the kill: {}",
            chain.len()
        );
    }
    drop(p);

    let p = Process::start(data.path(), policies.path());
    let s = &p.server;
    for chain in &quiet {
        // The latest token rotates; the first one is reuse.
        let latest = chain.last().unwrap();
        assert_eq!(s.refresh("spa", latest).status, 200);
        let d = s
            .refresh("spa", &chain[0])
            .assert_error(400, "invalid_grant");
        assert_eq!(d, "refresh token reuse detected; token family revoked");
    }
    for chain in &busy {
        // The last acknowledged token works whether or not the rotation in
        // flight at the kill became durable (grace covers the latter).
        let n = chain.len();
        let r = s.refresh("spa", &chain[n - 1]);
        assert_eq!(r.status, 200, "last acknowledged token: {}", r.text());
        // Two rotations back was rotated out for good before the kill.
        let d = s
            .refresh("spa", &chain[n - 3])
            .assert_error(400, "invalid_grant");
        assert_eq!(d, "refresh token reuse detected; token family revoked");
    }
}

/// SIGHUP reloads the policy directory; SIGTERM drains and exits 0 after
/// flushing the store.
#[test]
fn sighup_reloads_and_sigterm_shuts_down_gracefully() {
    let data = TempDir::new("signals-data");
    let policies = TempDir::new("signals-policies");
    policies_with(policies.path(), "[defaults]\nidle_ttl = \"30d\"\n");
    let mut p = Process::start(data.path(), policies.path());
    let version =
        |p: &Process| p.server.admin("GET", "/healthz", None).json()["policy_version"].clone();
    let v0 = version(&p);
    let rt = p.server.family("spa", "sig-user", "openid");

    policies_with(policies.path(), "[defaults]\nidle_ttl = \"7d\"\n");
    p.signal("HUP");
    wait_for(&p.lines, "policy set reloaded");
    assert_ne!(version(&p), v0);

    // A broken file: the set in force stays, the failure is logged.
    policies_with(policies.path(), "[defaults]\nidle_ttl = 7\n");
    let v1 = version(&p);
    p.signal("HUP");
    wait_for(
        &p.lines,
        "policy reload failed; the set in force keeps serving",
    );
    assert_eq!(version(&p), v1);

    let rt2 = token(&p.server.refresh("spa", &rt));
    p.signal("TERM");
    wait_for(&p.lines, "stopped; store flushed");
    let status = p.child.wait().unwrap();
    assert!(status.success(), "{status}");
    // Neither the admin token nor any refresh token reaches the log.
    thread::sleep(Duration::from_millis(100));
    let log = p.log.lock().unwrap().join("\n");
    for secret in [ADMIN, rt.as_str(), rt2.as_str()] {
        assert!(!log.contains(secret), "a secret in the log:\n{log}");
    }
    drop(p);
    policies_with(policies.path(), "[defaults]\nidle_ttl = \"7d\"\n");
    let p = Process::start(data.path(), policies.path());
    assert_eq!(p.server.refresh("spa", &rt2).status, 200);
}
