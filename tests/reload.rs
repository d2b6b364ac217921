//! Live policy reload (issue 3, item 4): on demand, on file change, failures
//! keeping the set in force, and swaps never tearing a decision. SIGHUP is
//! in `tests/reload_sighup.rs`, a binary of its own, since a signal reaches
//! the whole process.
#![cfg(feature = "watch")]

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use refresh_guard::RedeemRequest;
use refresh_guard::{
    AcceptKind, Engine, EventKind, IssueRequest, MemorySink, PolicyReloader, PolicySet,
    PolicyVersion, Profile, ReloadError,
};

const CLIENT: &str = "app";

fn ip() -> IpAddr {
    "10.0.0.1".parse().unwrap()
}

fn write(dir: &Path, name: &str, text: &str) {
    // Write then rename, as careful tools do, so a watcher never reads half
    // a file; the loader must cope with either.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn engine_with(sink: Arc<MemorySink>) -> Arc<Engine> {
    Arc::new(Engine::builder().events(sink).build().unwrap())
}

/// Poll until `f` holds, for at most `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[test]
fn reload_on_demand_puts_the_directory_in_force() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        "[clients.app]\nrotation = \"reuse\"\n",
    );
    let sink = Arc::new(MemorySink::new());
    let engine = engine_with(sink.clone());
    let before = engine.policies().version();
    let reloader = PolicyReloader::new(engine.clone(), dir.path());

    let v = reloader.reload().unwrap();
    assert_eq!(v, PolicySet::load_dir(dir.path()).unwrap().version());
    assert_eq!(engine.policies().version(), v);
    assert_ne!(v, before);
    let events = sink.take();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::PolicySwapped { from: before });
    assert_eq!(events[0].policy_version, v);

    // Same content, respelt: same version, nothing swapped, no event.
    write(
        dir.path(),
        "a.toml",
        "# reformatted\n[clients.app]\nrotation   =   'reuse'\n",
    );
    assert_eq!(reloader.reload().unwrap(), v);
    assert!(sink.take().is_empty());
}

#[test]
fn failed_reload_keeps_the_set_in_force_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        "[clients.app]\nrotation = \"reuse\"\n",
    );
    let sink = Arc::new(MemorySink::new());
    let engine = engine_with(sink.clone());
    let reloader = PolicyReloader::new(engine.clone(), dir.path());
    let good = reloader.reload().unwrap();
    sink.take();

    // One good file and one bad: nothing of either is applied.
    write(
        dir.path(),
        "a.toml",
        "[clients.app]\nrotation = \"rotate\"\n",
    );
    write(
        dir.path(),
        "b.toml",
        "[clients.web]\ngrace_period = \"6m\"\n",
    );
    let Err(ReloadError::Load(errors)) = reloader.reload() else {
        panic!("a set that does not load must be refused as such");
    };
    assert_eq!(errors.len(), 1);
    assert_eq!(engine.policies().version(), good);

    let events = sink.take();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind.as_str(), "policy_reload_failed");
    assert_eq!(events[0].policy_version, good, "names the set in force");
    let EventKind::PolicyReloadFailed { errors: reported } = &events[0].kind else {
        unreachable!()
    };
    assert_eq!(
        reported,
        &[format!(
            "{}: clients.web.grace_period: 6m is longer than the maximum 5m",
            dir.path().join("b.toml:2:16").display()
        )]
    );
    assert_eq!(engine.stats().events.get("policy_reload_failed"), 1);
}

#[test]
fn a_reload_that_breaks_a_required_profile_is_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "[defaults]\n");
    let sink = Arc::new(MemorySink::new());
    let engine = engine_with(sink.clone());
    let rfc9700 = Profile::named("rfc9700").unwrap();
    let reloader = PolicyReloader::requiring(engine.clone(), dir.path(), vec![rfc9700]);
    assert_eq!(reloader.required_profiles().len(), 1);
    let good = reloader.reload().unwrap();
    sink.take();

    // Loads fine, but reuse only reports: RFC 9700 §4.14.2 wants it to revoke.
    write(
        dir.path(),
        "a.toml",
        "[defaults]\n[clients.app]\non_reuse = \"report_only\"\n",
    );
    let refused = PolicySet::load_dir(dir.path()).unwrap();
    let Err(ReloadError::ProfileNotMet { version, reports }) = reloader.reload() else {
        panic!("a set that breaks a required profile must be refused");
    };
    assert_eq!(version, refused.version());
    assert_eq!(reports, [refused.check_profile(rfc9700)]);
    assert_eq!(engine.policies().version(), good, "the old set stays");
    let events = sink.take();
    assert_eq!(events.len(), 1, "{events:?}");
    let EventKind::PolicyReloadFailed { errors } = &events[0].kind else {
        panic!("{events:?}")
    };
    assert_eq!(
        errors,
        &[format!(
            "policy version {version} does not meet profile rfc9700: 1 control not met"
        )]
    );
    // Without the requirement the same set goes in.
    let plain = PolicyReloader::new(engine.clone(), dir.path());
    assert_eq!(plain.reload().unwrap(), version);
}

#[test]
fn file_change_reloads_after_a_quiet_period() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "[defaults]\n");
    let sink = Arc::new(MemorySink::new());
    let engine = engine_with(sink.clone());
    let reloader = PolicyReloader::new(engine.clone(), dir.path());
    let first = reloader.reload().unwrap();
    let trigger = reloader.watch(Duration::from_millis(100)).unwrap();

    // A new file in the directory is picked up.
    write(dir.path(), "b.toml", "[clients.app]\nidle_ttl = \"1d\"\n");
    let second = PolicySet::load_dir(dir.path()).unwrap().version();
    assert_ne!(first, second);
    assert!(
        eventually(Duration::from_secs(5), || engine.policies().version()
            == second),
        "the change was not reloaded"
    );

    // A broken change is reported and keeps the set in force.
    sink.take();
    write(
        dir.path(),
        "b.toml",
        "[clients.app]\nidle_ttl = \"1 day\"\n",
    );
    assert!(
        eventually(Duration::from_secs(5), || sink
            .events()
            .iter()
            .any(|e| e.kind.as_str() == "policy_reload_failed")),
        "the failed reload was not reported"
    );
    assert_eq!(engine.policies().version(), second);

    // Stopped: changes are no longer followed.
    trigger.stop();
    write(dir.path(), "b.toml", "[clients.app]\nidle_ttl = \"2d\"\n");
    thread::sleep(Duration::from_millis(500));
    assert_eq!(engine.policies().version(), second);
}

/// Threads redeem without pause while another swaps between two sets that
/// every decision can tell apart: under A a redemption rotates, under B it
/// keeps the token. A decision naming one set's version but acting by the
/// other's rules would be a torn read.
#[test]
fn swaps_never_tear_a_decision() {
    const SWAPS: usize = 1_000;
    const REDEEMERS: usize = 3;

    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    write(
        a_dir.path(),
        "p.toml",
        "[clients.app]\nrotation = \"rotate\"\n",
    );
    write(
        b_dir.path(),
        "p.toml",
        "[clients.app]\nrotation = \"reuse\"\n",
    );
    let a = PolicySet::load_dir(a_dir.path()).unwrap();
    let b = PolicySet::load_dir(b_dir.path()).unwrap();
    let (va, vb) = (a.version(), b.version());
    assert_ne!(va, vb);

    let engine = Arc::new(Engine::builder().policies(a).build().unwrap());
    let to_a = PolicyReloader::new(engine.clone(), a_dir.path());
    let to_b = PolicyReloader::new(engine.clone(), b_dir.path());
    let done = Arc::new(AtomicBool::new(false));

    let redeemers: Vec<_> = (0..REDEEMERS)
        .map(|i| {
            let engine = engine.clone();
            let done = done.clone();
            thread::spawn(move || {
                let subject = format!("user-{i}");
                let mut token = engine
                    .issue(&IssueRequest {
                        client: CLIENT,
                        subject: &subject,
                        scope: "openid",
                        ip: Some(ip()),
                    })
                    .unwrap()
                    .accepted()
                    .unwrap()
                    .token;
                let (mut rotated, mut kept) = (0u64, 0u64);
                while !done.load(Ordering::Relaxed) {
                    let d = engine
                        .redeem(&RedeemRequest::new(&token, CLIENT).ip(ip()))
                        .unwrap();
                    let acc = d
                        .accepted()
                        .unwrap_or_else(|| panic!("denied: {d:?}"))
                        .clone();
                    match (acc.kind, acc.policy_version) {
                        (AcceptKind::Rotated, v) if v == va => rotated += 1,
                        (AcceptKind::Kept, v) if v == vb => kept += 1,
                        (kind, v) => {
                            panic!("torn decision: {kind:?} under {v} (A = {va}, B = {vb})")
                        }
                    }
                    token = acc.token;
                }
                (rotated, kept)
            })
        })
        .collect();

    let mut versions: Vec<PolicyVersion> = Vec::with_capacity(SWAPS);
    for i in 0..SWAPS {
        let r = if i % 2 == 0 { &to_b } else { &to_a };
        versions.push(r.reload().unwrap());
        if i % 64 == 0 {
            // Let the redeemers run under each set now and then, also on
            // two cores.
            thread::yield_now();
        }
    }
    done.store(true, Ordering::Relaxed);
    let (mut rotated, mut kept) = (0, 0);
    for t in redeemers {
        let (r, k) = t.join().unwrap();
        rotated += r;
        kept += k;
    }
    assert_eq!(engine.stats().events.get("policy_swapped"), SWAPS as u64);
    assert!(versions.iter().filter(|v| **v == vb).count() == SWAPS / 2);
    // Both sets decided something, so the check above was exercised.
    assert!(rotated > 0 && kept > 0, "rotated {rotated}, kept {kept}");
}
