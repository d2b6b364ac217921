//! Fault drill for the shared store (README "Several instances"): Redis
//! (AOF, `appendfsync always`) is SIGKILLed and restarted while two
//! engines rotate token chains on eight threads. Every answer is correct
//! or a store error; nothing acknowledged is lost; the engines serve again
//! without being restarted.
#![cfg(feature = "redis")]

mod redis_support;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis_support::RedisServer;
use refresh_guard::{
    AcceptKind, Engine, Error, IssueRequest, KeyId, KeyRing, KeySecret, PolicyOverrides, PolicySet,
    RedeemRequest, RedisOptions, RedisStore, SystemClock,
};

const CLIENT: &str = "mobile-app";
const THREADS: usize = 8;
const KILLS: usize = 3;

fn ip() -> Option<IpAddr> {
    Some("10.0.0.1".parse().unwrap())
}

/// One chain: its last acknowledged token and generation.
struct Chain {
    token: String,
    generation: u32,
}

/// Issue until the store answers (it may be down).
fn issue(engine: &Engine, subject: &str, stop: &AtomicBool) -> Option<Chain> {
    while !stop.load(Ordering::SeqCst) {
        match engine.issue(&IssueRequest {
            client: CLIENT,
            subject,
            scope: "openid",
            ip: ip(),
        }) {
            Ok(d) => {
                let a = d.accepted().expect("issue is accepted");
                return Some(Chain {
                    token: a.token.as_str().to_owned(),
                    generation: a.generation.get(),
                });
            }
            Err(Error::Store { .. }) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("issue: {e}"),
        }
    }
    None
}

#[test]
fn redis_killed_under_load_loses_nothing_acknowledged_and_service_resumes() {
    let mut server = RedisServer::options().aof().start();
    let keys = KeyRing::new(KeyId(1), &KeySecret::generate().unwrap());
    // Grace, so that a retry after an error whose write went through gets
    // the successor it lost (README "The order of checks").
    let set = PolicySet::builder()
        .client(
            CLIENT,
            PolicyOverrides::new()
                .grace_period(Duration::from_secs(60))
                .grace_max_replays(255),
        )
        .build()
        .unwrap();
    let engines: Vec<Engine> = (0..2)
        .map(|_| {
            let mut o = RedisOptions::default();
            o.key_ttl = None;
            Engine::builder()
                .keys(keys.clone())
                .policies(set.clone())
                .clock(SystemClock)
                .shared_store(RedisStore::connect(&server.url(), o).unwrap())
                .build()
                .unwrap()
        })
        .collect();
    let stop = AtomicBool::new(false);
    let acks = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let chains = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|i| {
                let (engines, stop, acks, errors) = (&engines, &stop, &acks, &errors);
                s.spawn(move || {
                    let subject = format!("user-{i}");
                    let mut chain = issue(&engines[i % 2], &subject, stop)?;
                    let mut n = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        // Alternate engines: every redemption crosses over.
                        let engine = &engines[(i + n) % 2];
                        n += 1;
                        let req = RedeemRequest::new(&chain.token, CLIENT).ip(ip());
                        match engine.redeem(&req) {
                            Ok(d) => {
                                let Some(a) = d.accepted() else {
                                    panic!("chain {i} at {}: denied {d:?}", chain.generation);
                                };
                                assert!(
                                    matches!(a.kind, AcceptKind::Rotated | AcceptKind::GraceReplay),
                                    "{a:?}"
                                );
                                assert_eq!(
                                    a.generation.get(),
                                    chain.generation + 1,
                                    "chain {i}: one generation per acknowledged redemption"
                                );
                                chain.token = a.token.as_str().to_owned();
                                chain.generation += 1;
                                acks.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(Error::Store { .. }) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            Err(e) => panic!("chain {i}: {e}"),
                        }
                    }
                    Some(chain)
                })
            })
            .collect();
        let mut after_last_restart = 0;
        for _ in 0..KILLS {
            std::thread::sleep(Duration::from_millis(400));
            server.kill();
            std::thread::sleep(Duration::from_millis(200));
            server.restart();
            after_last_restart = acks.load(Ordering::Relaxed);
        }
        // Service resumes with the same engines.
        let deadline = Instant::now() + Duration::from_secs(10);
        while acks.load(Ordering::Relaxed) < after_last_restart + 200 {
            assert!(Instant::now() < deadline, "no progress after the restart");
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::SeqCst);
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(
        errors.load(Ordering::Relaxed) > 0,
        "the kills were never seen"
    );
    // Nothing acknowledged lost: each chain's last token is current, in
    // the store, on both engines.
    for (i, chain) in chains.into_iter().enumerate() {
        let chain = chain.expect("every chain started");
        for e in &engines {
            let seen = e.introspect(&chain.token).expect("known");
            assert!(seen.active, "chain {i}: {seen:?}");
            assert_eq!(seen.current_generation.get(), chain.generation, "chain {i}");
        }
    }
}
