//! `/healthz` when the store's disk is full: the writer fails with `ENOSPC`
//! at the file layer (`LogHooks::write`, as tests/disk_full.rs does for the
//! library), the store fails closed, and `/healthz` answers 503 naming the
//! store (README "Durability").
// ENOSPC is errno 28 on Linux; the test names it by number, as the server
// has no libc dependency.
#![cfg(target_os = "linux")]

mod server_http;

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use refresh_guard::{Durability, LogHooks};
use refresh_guard_server::StoreHooks;
use server_http::*;

const ENOSPC: i32 = 28;

/// A disk that fills up on demand: every write after [`Disk::fill`] fails
/// as write(2) does on a full disk.
#[derive(Default)]
struct Disk {
    state: Mutex<(bool, usize)>,
    failed: Condvar,
}

impl Disk {
    fn fill(&self) {
        self.state.lock().unwrap().0 = true;
    }

    /// Wait until a write has failed.
    fn wait_failed(&self) {
        let s = self.state.lock().unwrap();
        let (_s, t) = self
            .failed
            .wait_timeout_while(s, Duration::from_secs(30), |s| s.1 == 0)
            .unwrap();
        assert!(!t.timed_out(), "no write met the full disk");
    }
}

impl LogHooks for Disk {
    fn write(&self, _path: &Path, file: &mut File, buf: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if s.0 {
            s.1 += 1;
            self.failed.notify_all();
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        file.write_all(buf)
    }
}

fn on_disk(name: &str, durability: Durability) -> (Arc<Disk>, TestServer) {
    let disk = Arc::new(Disk::default());
    let hooks = StoreHooks(disk.clone());
    let s = TestServer::with(name, |c| {
        c.durability = durability;
        c.store_hooks = Some(hooks);
    });
    (disk, s)
}

/// The body of a `/healthz` that reports the failed store, on either
/// listener; the admin one adds the operating system's error.
fn assert_store_failed(h: &Resp, admin: bool) {
    assert_eq!(h.status, 503, "{}", h.text());
    let j = h.json();
    assert_eq!(j["status"], "failing", "{j}");
    assert_eq!(j["store"], "failed", "{j}");
    assert!(
        j["fault"].as_str().unwrap().contains("store failed closed"),
        "{j}"
    );
    let detail = j["detail"].as_str();
    if admin {
        assert!(detail.unwrap().contains("No space left on device"), "{j}");
    } else {
        assert_eq!(detail, None, "file names stay off the public listener: {j}");
    }
}

/// Shutdown flushes the store, which refuses: the server says so.
fn stop_failed(mut s: TestServer) {
    let e = s.server.take().unwrap().shutdown().unwrap_err();
    assert!(e.to_string().contains("No space left on device"), "{e}");
}

/// Regression: `/healthz` answered 503 with only `"status": "failing"`
/// once a refresh met a full disk, naming neither the store nor its error.
#[test]
fn healthz_names_the_store_after_a_refresh_meets_a_full_disk() {
    let (disk, s) = on_disk("disk-full-sync", Durability::Sync);
    let h = s.get("/healthz");
    assert_eq!(h.status, 200, "{}", h.text());
    assert_eq!(h.json()["store"], "ok");
    let rt = s.family("spa", "user-1", "openid");

    disk.fill();
    let r = s.refresh("spa", &rt);
    assert!(
        r.status >= 500,
        "a rotation not on disk was answered: {}",
        r.text()
    );

    assert_store_failed(&s.get("/healthz"), false);
    assert_store_failed(&s.admin("GET", "/healthz", None), true);
    stop_failed(s);
}

/// Regression: with batched durability the write that meets the full disk
/// belongs to a request already answered, so no request saw the failure
/// and `/healthz` kept answering 200 over a store that refuses every
/// change. It now asks the store itself.
#[test]
fn healthz_fails_when_a_batched_write_no_request_waits_for_meets_a_full_disk() {
    let (disk, s) = on_disk(
        "disk-full-batched",
        Durability::Batched(Duration::from_millis(5)),
    );
    disk.fill();
    // Acknowledged at once; the writer fails on it afterwards.
    let _code = s.code("spa", "user-2", "openid");
    disk.wait_failed();
    // The hook has returned its error; the writer marks the store failed
    // right after. Poll for that step, bounded: before the fix this never
    // turned 503.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut h = s.get("/healthz");
    while h.status == 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        h = s.get("/healthz");
    }
    assert_store_failed(&h, false);
    assert_store_failed(&s.admin("GET", "/healthz", None), true);
    stop_failed(s);
}
