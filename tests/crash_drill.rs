//! Crash drill: a worker process rotates token chains on several threads
//! in sync mode while a compaction runs every 200 ms, and is SIGKILLed at
//! random points (mid-rotation, mid-fsync, mid-snapshot, mid-recovery).
//! After every restart each chain's last acknowledged token is still
//! redeemable and every older one is refused (README "Durability";
//! docs/store.md "Writing and acknowledging").
//!
//! The worker is this test binary re-run on the drill test alone, with
//! `REFRESH_GUARD_DRILL_DIR` naming its directory. It prints a chain's
//! token only after `issue`/`redeem` returned it, so every printed token
//! was acknowledged. `REFRESH_GUARD_DRILL_KILLS` sets the number of kills
//! (default 50) and `REFRESH_GUARD_DRILL_SEED` replays a run's kill times.

mod store_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use refresh_guard::RedeemRequest;
use refresh_guard::{
    AcceptKind, Decision, DenyReason, Durability, Engine, Error, IssueRequest, LogOptions,
    LogStore, OnReuse, PolicyOverrides, PolicySet, Status,
};
use store_support::{CLIENT, ip, keys, temp_dir};

const WORKER_ENV: &str = "REFRESH_GUARD_DRILL_DIR";
const KILLS_ENV: &str = "REFRESH_GUARD_DRILL_KILLS";
const SEED_ENV: &str = "REFRESH_GUARD_DRILL_SEED";
const THREADS: usize = 4;
const COMPACT_EVERY: Duration = Duration::from_millis(200);
/// The worker lives this long (uniformly drawn) before it is killed: long
/// enough for a few compactions, short enough for 50 kills in CI.
const LIFE_MS: std::ops::Range<u64> = 20..600;

/// The drill's policy. A grace period long enough for the check after a
/// restart: a rotation persisted but killed before it was answered leaves
/// the client holding the predecessor, which must then replay to the
/// persisted successor (README "Order of checks", step 7). `report_only`
/// lets the check present older tokens and see them refused without
/// revoking the chain it goes on drilling.
fn drill_engine(store: &Path) -> Result<Engine, Error> {
    let policy = PolicyOverrides::new()
        .grace_period(Duration::from_secs(300))
        .grace_max_replays(u8::MAX)
        .on_reuse(OnReuse::ReportOnly);
    let set = PolicySet::builder().client(CLIENT, policy).build()?;
    let options = LogOptions {
        durability: Durability::Sync,
    };
    Engine::builder()
        .keys(keys())
        .policies(set)
        .store(LogStore::open(store, options)?)
        .build()
}

/// A line on the worker's stdout, written whole and flushed.
fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    out.write_fmt(line).unwrap();
    out.write_all(b"\n").unwrap();
    out.flush().unwrap();
}

/// The worker stops at its first surprise and says why; the parent fails
/// the drill on that line.
fn worker_fail(what: String) -> ! {
    say(format_args!("FAIL {}", what.replace('\n', " ")));
    std::process::exit(101);
}

/// The worker: continues the chains listed in `DIR/chains` (`id token`
/// lines, after a `next ID` line) and starts one new chain per thread,
/// rotating each round-robin until killed; compacts every 200 ms.
fn worker(work: &Path) {
    let e =
        drill_engine(&work.join("log")).unwrap_or_else(|err| worker_fail(format!("open: {err}")));
    let list = std::fs::read_to_string(work.join("chains")).unwrap();
    let mut lines = list.lines();
    let next: usize = lines
        .next()
        .and_then(|l| l.strip_prefix("next "))
        .and_then(|n| n.parse().ok())
        .unwrap();
    let mut mine: Vec<Vec<(usize, String)>> = vec![Vec::new(); THREADS];
    for l in lines {
        let (id, token) = l.split_once(' ').unwrap();
        let id: usize = id.parse().unwrap();
        mine[id % THREADS].push((id, token.to_owned()));
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            loop {
                std::thread::sleep(COMPACT_EVERY);
                if let Err(err) = e.compact() {
                    worker_fail(format!("compaction: {err}"));
                }
            }
        });
        for (k, mut chains) in mine.into_iter().enumerate() {
            let e = &e;
            s.spawn(move || {
                let id = next + k;
                let d = e
                    .issue(&IssueRequest {
                        client: CLIENT,
                        subject: &format!("s{id}"),
                        scope: "openid",
                        ip: Some(ip()),
                    })
                    .unwrap_or_else(|err| worker_fail(format!("issue {id}: {err}")));
                let Decision::Accept(a) = d else {
                    worker_fail(format!("issue {id}: {d:?}"));
                };
                say(format_args!("ACK {id} {}", a.token.as_str()));
                chains.push((id, a.token.as_str().to_owned()));
                for i in (0..chains.len()).cycle() {
                    let (id, token) = &mut chains[i];
                    let d = e
                        .redeem(&RedeemRequest::new(token, CLIENT).ip(ip()))
                        .unwrap_or_else(|err| worker_fail(format!("chain {id}: {err}")));
                    match d {
                        Decision::Accept(a) if a.kind == AcceptKind::Rotated => {
                            *token = a.token.as_str().to_owned();
                            // Only now is it acknowledged: redeem returned.
                            say(format_args!("ACK {id} {token}"));
                        }
                        d => worker_fail(format!("chain {id}: {d:?}")),
                    }
                }
            });
        }
    });
}

/// A worker's run: the acknowledged tokens in order, from whole lines only
/// (a line the kill cut short was not fully said).
fn read_acks(out: impl std::io::Read) -> Result<Vec<(usize, String)>, String> {
    let mut r = BufReader::new(out);
    let mut acks = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return Ok(acks),
            Ok(_) if !line.ends_with('\n') => return Ok(acks),
            Ok(_) => {}
        }
        let line = line.trim_end();
        if let Some(why) = line.strip_prefix("FAIL ") {
            return Err(why.to_owned());
        }
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (id, token) = rest.split_once(' ').unwrap();
            acks.push((id.parse().unwrap(), token.to_owned()));
        }
    }
}

#[derive(Default)]
struct Tally {
    acks: usize,
    /// Restarts that found a rotation persisted but never answered.
    replays: usize,
    /// Kills that landed while a snapshot was being written.
    mid_snapshot: usize,
    reuse_checked: usize,
}

fn redeem(e: &Engine, token: &str) -> Decision {
    e.redeem(&RedeemRequest::new(token, CLIENT).ip(ip()))
        .unwrap()
}

/// Check one chain after a restart and redeem its last acknowledged
/// token; returns the token the chain goes on with.
fn check_chain(e: &Engine, run: usize, id: usize, chain: &[String], tally: &mut Tally) -> String {
    let at = |what: &str| format!("kill {run}, chain {id}: {what}");
    let last = chain.last().unwrap();
    let info = e
        .introspect(last)
        .unwrap_or_else(|| panic!("{}", at("last acknowledged token unknown after restart")));
    assert_eq!(info.status, Status::Active, "{}", at("family not active"));
    let (g, c) = (info.generation.get(), info.current_generation.get());
    // The worker redeems only a token it has acknowledged, so at most one
    // rotation past it can have been persisted unanswered.
    assert!(
        c == g || c == g + 1,
        "{}",
        at(&format!(
            "acknowledged generation {g}, recovered current generation {c}"
        ))
    );
    let older = &chain[..chain.len() - 1];
    for (k, t) in older.iter().enumerate() {
        let i = e.introspect(t).unwrap();
        assert!(
            !i.active && i.current_generation.get() == c,
            "{}",
            at(&format!("older token #{k} active again: {i:?}"))
        );
    }
    // Present older tokens: the predecessor of the current generation is
    // a grace replay of it, anything older is reuse. The oldest and the
    // two newest are presented (every one is inactive, checked above).
    let mut present: Vec<usize> = vec![0];
    present.extend(older.len().saturating_sub(2)..older.len());
    present.dedup();
    for k in present.into_iter().filter(|&k| k < older.len()) {
        let d = redeem(e, &older[k]);
        if k + 1 == older.len() && c == g {
            let a = d
                .accepted()
                .unwrap_or_else(|| panic!("{}", at(&format!("{d:?}"))));
            assert_eq!(a.kind, AcceptKind::GraceReplay, "{}", at("predecessor"));
            assert_eq!(a.token.as_str(), last, "{}", at("replay's successor"));
        } else {
            assert_eq!(
                d.deny_reason(),
                Some(DenyReason::ReuseDetected),
                "{}",
                at(&format!("older token #{k}: {d:?}"))
            );
            tally.reuse_checked += 1;
        }
    }
    let d = redeem(e, last);
    let a = d
        .accepted()
        .unwrap_or_else(|| panic!("{}", at(&format!("last acknowledged token: {d:?}"))));
    if c == g {
        assert_eq!(a.kind, AcceptKind::Rotated, "{}", at("last acknowledged"));
    } else {
        // Persisted, never answered: the client retries with what it
        // holds and gets the successor that was persisted.
        assert_eq!(
            a.kind,
            AcceptKind::GraceReplay,
            "{}",
            at("last acknowledged")
        );
        assert_eq!(a.generation.get(), c, "{}", at("replay's successor"));
        let s = e.introspect(a.token.as_str()).unwrap();
        assert!(s.active, "{}", at("replay's successor is not current"));
        tally.replays += 1;
    }
    a.token.as_str().to_owned()
}

/// The drill (see the module docs). Acts as the worker when started by
/// itself with `REFRESH_GUARD_DRILL_DIR` set.
#[test]
fn acknowledged_tokens_survive_sigkill_through_compaction() {
    if let Ok(dir) = std::env::var(WORKER_ENV) {
        worker(Path::new(&dir));
        return;
    }
    let kills: usize = std::env::var(KILLS_ENV).map_or(50, |k| k.parse().unwrap());
    let mut seed: u64 = std::env::var(SEED_ENV).map_or_else(
        |_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        },
        |s| s.parse().unwrap(),
    );
    eprintln!("crash drill: {kills} kills, {SEED_ENV}={seed}");
    let work = temp_dir("drill");
    let store = work.join("log");
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let mut chains: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut next = 0;
    let mut tally = Tally::default();
    for run in 0..kills {
        let mut list = format!("next {next}\n");
        for (id, c) in &chains {
            list.push_str(&format!("{id} {}\n", c.last().unwrap()));
        }
        std::fs::write(work.join("chains"), list).unwrap();
        next += THREADS;
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "acknowledged_tokens_survive_sigkill_through_compaction",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(WORKER_ENV, &*work)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || read_acks(out));
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(
            LIFE_MS.start + seed % (LIFE_MS.end - LIFE_MS.start),
        ));
        let early = child.try_wait().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acks = reader
            .join()
            .unwrap()
            .unwrap_or_else(|why| panic!("kill {run}: the worker failed: {why}"));
        assert!(early.is_none(), "kill {run}: the worker exited: {early:?}");
        tally.acks += acks.len();
        for (id, token) in acks {
            chains.entry(id).or_default().push(token);
        }
        let snapshot_tmp = std::fs::read_dir(&store)
            .unwrap()
            .any(|f| f.unwrap().path().extension().is_some_and(|x| x == "tmp"));
        tally.mid_snapshot += usize::from(snapshot_tmp);
        // Restart: must open without repair, whatever the kill interrupted.
        let e =
            drill_engine(&store).unwrap_or_else(|err| panic!("kill {run}: restart failed: {err}"));
        for (id, chain) in chains.iter_mut() {
            let now = check_chain(&e, run, *id, chain, &mut tally);
            chain.push(now);
        }
        drop(e);
    }
    eprintln!(
        "crash drill: {kills} kills in {:.1?}: {} acknowledged, {} chains, {} rotations \
         persisted unanswered, {} kills mid-snapshot, {} older tokens refused",
        started.elapsed(),
        tally.acks,
        chains.len(),
        tally.replays,
        tally.mid_snapshot,
        tally.reuse_checked,
    );
    assert!(
        tally.acks >= 20 * kills,
        "the worker made too little progress to drill anything"
    );
}
