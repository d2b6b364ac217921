//! The Redis test harness (tests/redis_support) does what the Redis store's
//! tests rely on: servers that start, persist, restart, replicate and never
//! outlive their test.

mod redis_support;

use std::path::Path;
use std::time::Duration;

use redis_support::{RedisServer, Reply};

fn ok() -> Reply {
    Reply::Simple("OK".into())
}

fn bulk(s: &str) -> Reply {
    Reply::Bulk(Some(s.as_bytes().to_vec()))
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn starts_on_loopback_and_answers_ping() {
    let server = RedisServer::start();
    assert_eq!(server.cmd(&["PING"]), Reply::Simple("PONG".into()));
    assert_eq!(
        server.url(),
        format!("redis://127.0.0.1:{}/", server.port())
    );
    let bind = server.cmd(&["CONFIG", "GET", "bind"]);
    assert_eq!(
        bind,
        Reply::Array(Some(vec![bulk("bind"), bulk("127.0.0.1")]))
    );
    let protected = server.cmd(&["CONFIG", "GET", "protected-mode"]);
    assert_eq!(
        protected,
        Reply::Array(Some(vec![bulk("protected-mode"), bulk("yes")]))
    );
    let save = server.cmd(&["CONFIG", "GET", "save"]);
    assert_eq!(save, Reply::Array(Some(vec![bulk("save"), bulk("")])));
}

#[test]
fn aof_keeps_a_write_acknowledged_before_sigkill() {
    let mut server = RedisServer::options().aof().start();
    let port = server.port();
    let first_pid = server.pid();
    assert_eq!(server.cmd(&["SET", "family", "gen-7"]), ok());
    server.kill();
    assert!(!server.is_running());
    server.restart();
    assert_ne!(server.pid(), first_pid, "restart spawned a new process");
    assert_eq!(server.port(), port, "restart keeps the port");
    assert_eq!(server.cmd(&["GET", "family"]), bulk("gen-7"));
}

/// The control for the AOF test: without persistence the same SIGKILL and
/// restart lose the key, so the restart really starts a fresh process.
#[test]
fn without_aof_sigkill_loses_the_write() {
    let mut server = RedisServer::start();
    assert_eq!(server.cmd(&["SET", "family", "gen-7"]), ok());
    server.kill();
    server.restart();
    assert_eq!(server.cmd(&["GET", "family"]), Reply::Bulk(None));
}

#[test]
fn drop_leaves_no_process() {
    let server = RedisServer::start();
    let pid = server.pid();
    assert!(process_exists(pid));
    drop(server);
    assert!(
        !process_exists(pid),
        "redis-server {pid} outlived its RedisServer"
    );
}

#[test]
fn a_panicking_test_leaves_no_process() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let server = RedisServer::start();
        tx.send(server.pid()).unwrap();
        panic!("the test fails while its server runs");
    })
    .join();
    assert!(outcome.is_err());
    let pid = rx.recv().unwrap();
    assert!(!process_exists(pid), "redis-server {pid} outlived a panic");
}

#[test]
fn stop_ends_the_process_and_restart_brings_it_back() {
    let mut server = RedisServer::start();
    let pid = server.pid();
    server.stop();
    assert!(!process_exists(pid));
    server.restart();
    assert_eq!(server.cmd(&["PING"]), Reply::Simple("PONG".into()));
}

#[test]
fn two_servers_get_distinct_ports_and_separate_data() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    assert_eq!(a.cmd(&["SET", "k", "a"]), ok());
    assert_eq!(b.cmd(&["GET", "k"]), Reply::Bulk(None));
}

#[test]
fn replica_syncs_from_its_primary() {
    let primary = RedisServer::start();
    assert_eq!(primary.cmd(&["SET", "before", "1"]), ok());
    let replica = RedisServer::options().replica_of(&primary).start();
    replica.wait_until("master_link_status:up", Duration::from_secs(20), || {
        replica
            .cmd(&["INFO", "replication"])
            .text()
            .is_some_and(|i| i.contains("master_link_status:up"))
    });
    assert_eq!(replica.cmd(&["GET", "before"]), bulk("1"));
    assert_eq!(primary.cmd(&["SET", "after", "2"]), ok());
    replica.wait_until("the write after the sync", Duration::from_secs(20), || {
        replica.cmd(&["GET", "after"]) == bulk("2")
    });
}

#[test]
fn cluster_node_starts_with_its_node_file() {
    let node = RedisServer::options().cluster().start();
    let info = node.cmd(&["INFO", "cluster"]).text().unwrap();
    assert!(info.contains("cluster_enabled:1"), "{info}");
    let id = node.cmd(&["CLUSTER", "MYID"]).text().unwrap();
    assert_eq!(id.len(), 40, "a node id: {id}");
    assert!(node.dir().join("nodes.conf").exists());
}

#[test]
fn a_missing_binary_names_the_debian_package() {
    // A child process, so the REDIS_SERVER override stays out of this one.
    if std::env::var_os("REDIS_HARNESS_MISSING_BINARY").is_some() {
        RedisServer::start();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_missing_binary_names_the_debian_package",
            "--nocapture",
        ])
        .env("REDIS_HARNESS_MISSING_BINARY", "1")
        .env("REDIS_SERVER", "/nonexistent/redis-server")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a missing binary must fail, not skip"
    );
    assert!(
        stderr.contains("`redis-server`") && stderr.contains(".ci/run"),
        "{stderr}"
    );
}
