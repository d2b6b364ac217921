//! The shared store on a three-node Redis Cluster (README "Several
//! instances"): each family's keys carry its id as a hash tag, so its
//! script runs on its node; the answers are one engine's.
#![cfg(feature = "redis")]

mod redis_support;

use std::time::{Duration, Instant};

use redis_support::{RedisServer, Reply};
use refresh_guard::{
    AcceptKind, DenyReason, Engine, IssueRequest, KeyId, KeyRing, KeySecret, PolicyOverrides,
    PolicySet, RedeemRequest, RedisOptions, RedisStore, Timestamp,
};

const CLIENT: &str = "mobile-app";

fn text(r: Reply) -> String {
    match r {
        Reply::Simple(s) => s,
        other => other.text().unwrap_or_else(|| format!("{other:?}")),
    }
}

/// Three primaries sharing the 16384 slots, once every node says ok.
fn cluster() -> Vec<RedisServer> {
    cluster_of(3)
}

/// `n` nodes, the first three the primaries sharing the 16384 slots,
/// once every node knows every other and says ok.
fn cluster_of(n: usize) -> Vec<RedisServer> {
    let nodes: Vec<RedisServer> = (0..n)
        .map(|_| RedisServer::options().cluster().start())
        .collect();
    let ranges = [("0", "5460"), ("5461", "10922"), ("10923", "16383")];
    for (node, (from, to)) in nodes.iter().zip(ranges) {
        assert_eq!(
            text(node.cmd(&["CLUSTER", "ADDSLOTSRANGE", from, to])),
            "OK"
        );
    }
    for node in &nodes[1..n] {
        let bus = match node.cmd(&["CONFIG", "GET", "cluster-port"]) {
            Reply::Array(Some(kv)) => kv[1].text().unwrap(),
            other => panic!("{other:?}"),
        };
        let port = node.port().to_string();
        let met = nodes[0].cmd(&["CLUSTER", "MEET", "127.0.0.1", &port, &bus]);
        assert_eq!(text(met), "OK");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        node.wait_until("cluster_state:ok", deadline - Instant::now(), || {
            node.cmd(&["CLUSTER", "INFO"]).text().is_some_and(|i| {
                i.contains("cluster_state:ok") && i.contains(&format!("cluster_known_nodes:{n}"))
            })
        });
    }
    nodes
}

#[test]
fn engines_on_a_cluster_answer_as_one_engine_with_families_spread_over_its_nodes() {
    let nodes = cluster();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let keys = KeyRing::new(KeyId(1), &KeySecret::generate().unwrap());
    let set = PolicySet::builder()
        .client(CLIENT, PolicyOverrides::new().max_families_per_subject(3))
        .build()
        .unwrap();
    let engines: Vec<Engine> = (0..2)
        .map(|_| {
            let mut o = RedisOptions::default();
            o.key_ttl = None;
            Engine::builder()
                .keys(keys.clone())
                .policies(set.clone())
                .shared_store(RedisStore::connect_cluster(&urls, o).unwrap())
                .build()
                .unwrap()
        })
        .collect();
    let t0 = Timestamp::from_secs(1_700_000_000);
    let issue = |e: usize, subject: &str| {
        engines[e]
            .at(t0)
            .issue(&IssueRequest {
                client: CLIENT,
                subject,
                scope: "openid",
                ip: None,
            })
            .unwrap()
            .accepted()
            .unwrap()
            .token
    };
    let redeem = |e: usize, t: &refresh_guard::Token| {
        engines[e]
            .at(t0)
            .redeem(&RedeemRequest::new(t.as_str(), CLIENT))
            .unwrap()
    };
    let tokens: Vec<_> = (0..30)
        .map(|i| issue(i % 2, &format!("user-{i}")))
        .collect();
    for (i, t) in tokens.iter().enumerate() {
        let next = redeem((i + 1) % 2, t);
        assert_eq!(next.accepted().map(|a| a.kind), Some(AcceptKind::Rotated));
        // The rotated-out token, on the other engine, is reuse.
        assert_eq!(
            redeem(i % 2, t).deny_reason(),
            Some(DenyReason::ReuseDetected)
        );
        let t2 = next.accepted().unwrap().token;
        assert_eq!(
            redeem((i + 1) % 2, &t2).deny_reason(),
            Some(DenyReason::Revoked)
        );
    }
    // Families on every node: the hash tags spread them.
    for node in &nodes {
        let n = match node.cmd(&["DBSIZE"]) {
            Reply::Int(n) => n,
            other => panic!("{other:?}"),
        };
        assert!(n > 0, "a node holds no key");
    }
    // The cap, held by the subject's key on its own node.
    let capped: Vec<_> = (0..5).map(|i| issue(i % 2, "alice")).collect();
    let live = capped
        .iter()
        .filter(|t| engines[0].at(t0).introspect(t.as_str()).unwrap().active)
        .count();
    assert_eq!(live, 3);
    assert_eq!(engines[1].at(t0).revoke_subject("alice", None).unwrap(), 3);
}

/// Regression: `revoke_client` on a cluster was refused ("a scan of one
/// server"); it now scans every primary, and every family of the client,
/// whichever node holds it, ends.
#[test]
fn revoke_client_on_a_cluster_revokes_the_clients_families_on_every_primary() {
    let nodes = cluster();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let mut o = RedisOptions::default();
    o.key_ttl = None;
    let set = PolicySet::builder()
        .client(CLIENT, PolicyOverrides::new())
        .client("other-app", PolicyOverrides::new())
        .build()
        .unwrap();
    let engine = Engine::builder()
        .keys(KeyRing::new(KeyId(1), &KeySecret::generate().unwrap()))
        .policies(set)
        .shared_store(RedisStore::connect_cluster(&urls, o).unwrap())
        .build()
        .unwrap();
    let t0 = Timestamp::from_secs(1_700_000_000);
    let issue = |client: &str, subject: &str| {
        engine
            .at(t0)
            .issue(&IssueRequest {
                client,
                subject,
                scope: "openid",
                ip: None,
            })
            .unwrap()
            .accepted()
            .unwrap()
            .token
    };
    let mine: Vec<_> = (0..24)
        .map(|i| issue(CLIENT, &format!("bob-{i}")))
        .collect();
    let other = issue("other-app", "carol");
    for node in &nodes {
        assert!(!family_slots(node).is_empty(), "a node holds no family");
    }
    assert_eq!(engine.at(t0).revoke_client(CLIENT).unwrap(), 24);
    for t in &mine {
        let d = engine
            .at(t0)
            .redeem(&RedeemRequest::new(t.as_str(), CLIENT));
        assert_eq!(d.unwrap().deny_reason(), Some(DenyReason::Revoked));
    }
    let d = engine
        .at(t0)
        .redeem(&RedeemRequest::new(other.as_str(), "other-app"));
    assert!(
        d.unwrap().accepted().is_some(),
        "another client's family is left alone"
    );
}

/// A node's cluster id.
fn node_id(node: &RedisServer) -> String {
    text(node.cmd(&["CLUSTER", "MYID"]))
}

/// The slots of `node` that hold family keys (prefix `rg`).
fn family_slots(node: &RedisServer) -> Vec<String> {
    let mut slots = std::collections::BTreeSet::new();
    let mut cursor = "0".to_owned();
    loop {
        let Reply::Array(Some(r)) =
            node.cmd(&["SCAN", &cursor, "MATCH", "rg:f:*", "COUNT", "1000"])
        else {
            panic!("SCAN answered no array");
        };
        cursor = r[0].text().unwrap();
        let Reply::Array(Some(keys)) = &r[1] else {
            panic!("SCAN answered no keys");
        };
        for k in keys {
            match node.cmd(&["CLUSTER", "KEYSLOT", &k.text().unwrap()]) {
                Reply::Int(s) => slots.insert(s),
                other => panic!("{other:?}"),
            };
        }
        if cursor == "0" {
            return slots.into_iter().map(|s| s.to_string()).collect();
        }
    }
}

/// How many MOVED and ASK errors `node` has answered (INFO errorstats).
fn redirects(node: &RedisServer) -> (u64, u64) {
    let info = node.cmd(&["INFO", "errorstats"]).text().unwrap();
    let count = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("errorstat_{name}:count=")))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    (count("MOVED"), count("ASK"))
}

/// Move `slot` from `src` to `dst` as `redis-cli --cluster reshard` does:
/// IMPORTING and MIGRATING, MIGRATE of its keys, then the new owner on
/// every node. The pause between MIGRATE and the hand-over leaves a window
/// in which the source answers ASK for the moved keys.
fn move_slot(nodes: &[RedisServer], src: usize, dst: usize, slot: &str) {
    let (src_id, dst_id) = (node_id(&nodes[src]), node_id(&nodes[dst]));
    let ok = |r: Reply| assert_eq!(text(r), "OK");
    ok(nodes[dst].cmd(&["CLUSTER", "SETSLOT", slot, "IMPORTING", &src_id]));
    ok(nodes[src].cmd(&["CLUSTER", "SETSLOT", slot, "MIGRATING", &dst_id]));
    std::thread::sleep(Duration::from_millis(2));
    let port = nodes[dst].port().to_string();
    loop {
        let Reply::Array(Some(keys)) = nodes[src].cmd(&["CLUSTER", "GETKEYSINSLOT", slot, "100"])
        else {
            panic!("GETKEYSINSLOT answered no array");
        };
        if keys.is_empty() {
            break;
        }
        let keys: Vec<String> = keys.iter().map(|k| k.text().unwrap()).collect();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().map(String::as_str));
        ok(nodes[src].cmd(&args));
    }
    std::thread::sleep(Duration::from_millis(2));
    for n in [dst, src]
        .into_iter()
        .chain((0..nodes.len()).filter(|&i| i != src && i != dst))
    {
        ok(nodes[n].cmd(&["CLUSTER", "SETSLOT", slot, "NODE", &dst_id]));
    }
}

/// Families on every node redeemed from several threads and two engines
/// while the slots holding a third of them move to another node: every
/// answer is an acceptance that advances its family exactly once, or a
/// store error the caller repeats (a grace replay if the write had landed).
/// Returns how many redemptions failed with a store error.
fn redeem_through_a_reshard(nodes: &[RedisServer], options: RedisOptions) -> usize {
    use std::sync::atomic::{AtomicBool, Ordering};
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let keys = KeyRing::new(KeyId(1), &KeySecret::generate().unwrap());
    // A retry after a store error whose write had landed is a grace replay.
    let policy = PolicyOverrides {
        grace_period: Some(Duration::from_secs(60)),
        grace_max_replays: Some(255),
        ..PolicyOverrides::default()
    };
    let set = PolicySet::builder().client(CLIENT, policy).build().unwrap();
    let engines: Vec<Engine> = (0..2)
        .map(|_| {
            Engine::builder()
                .keys(keys.clone())
                .policies(set.clone())
                .shared_store(RedisStore::connect_cluster(&urls, options.clone()).unwrap())
                .build()
                .unwrap()
        })
        .collect();
    let t0 = Timestamp::from_secs(1_700_000_000);
    const THREADS: usize = 4;
    const PER_THREAD: usize = 40;
    let families: Vec<Vec<refresh_guard::Token>> = (0..THREADS)
        .map(|th| {
            (0..PER_THREAD)
                .map(|i| {
                    engines[i % 2]
                        .at(t0)
                        .issue(&IssueRequest {
                            client: CLIENT,
                            subject: &format!("user-{th}-{i}"),
                            scope: "openid",
                            ip: None,
                        })
                        .unwrap()
                        .accepted()
                        .unwrap()
                        .token
                })
                .collect()
        })
        .collect();
    let slots = family_slots(&nodes[0]);
    assert!(!slots.is_empty(), "node 0 holds no family");
    let stop = AtomicBool::new(false);
    let (engines, stop) = (&engines, &stop);
    let (results, moved) = std::thread::scope(|s| {
        let workers: Vec<_> = families
            .into_iter()
            .enumerate()
            .map(|(th, mut tokens)| {
                s.spawn(move || {
                    let mut steps = vec![0u32; tokens.len()];
                    let mut pending = vec![false; tokens.len()];
                    let mut errors = 0;
                    let mut round = 0usize;
                    while !stop.load(Ordering::Relaxed) || pending.iter().any(|&p| p) {
                        for i in 0..tokens.len() {
                            let e = &engines[(th + i + round) % 2];
                            let r = e
                                .at(t0)
                                .redeem(&RedeemRequest::new(tokens[i].as_str(), CLIENT));
                            match r {
                                Err(refresh_guard::Error::Store { .. }) => {
                                    errors += 1;
                                    pending[i] = true;
                                }
                                Err(other) => panic!("family {th}/{i}: {other}"),
                                Ok(d) => {
                                    let a = d.accepted().unwrap_or_else(|| {
                                        panic!("family {th}/{i}: wrong answer {d:?}")
                                    });
                                    // A grace replay only after an error
                                    // whose write had landed.
                                    assert!(
                                        a.kind == AcceptKind::Rotated
                                            || (a.kind == AcceptKind::GraceReplay && pending[i]),
                                        "family {th}/{i}: {:?} (pending {})",
                                        a.kind,
                                        pending[i]
                                    );
                                    tokens[i] = a.token;
                                    steps[i] += 1;
                                    pending[i] = false;
                                }
                            }
                        }
                        round += 1;
                    }
                    (tokens, steps, errors)
                })
            })
            .collect();
        for slot in &slots {
            move_slot(nodes, 0, 1, slot);
        }
        // A few more rounds on the new owners, then done.
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        (results, family_slots(&nodes[1]))
    });
    assert!(
        slots.iter().all(|s| moved.contains(s)),
        "the slots did not all move"
    );
    assert!(family_slots(&nodes[0]).is_empty());
    // The source redirected the engines (so they followed redirections).
    let redirected = redirects(&nodes[0]);
    eprintln!("node 0 answered (MOVED, ASK): {redirected:?}");
    assert!(
        redirected.0 + redirected.1 > 0,
        "no redirection was exercised"
    );
    // No lost rotation: each family's current generation is its first
    // plus the acceptances it answered, and the last token is current.
    let mut errors = 0;
    for (tokens, steps, e) in results {
        errors += e;
        for (t, n) in tokens.iter().zip(steps) {
            assert!(n > 0, "a family was never redeemed");
            let info = engines[0].at(t0).introspect(t.as_str()).unwrap();
            assert!(info.active);
            assert_eq!(info.generation, info.current_generation);
            assert_eq!(info.current_generation.get(), 1 + n);
        }
    }
    errors
}

/// Redis Cluster under a live reshard: the cluster client follows MOVED
/// and ASK, and no answer is wrong.
#[test]
fn a_live_reshard_loses_no_rotation_and_gives_no_wrong_answer() {
    let nodes = cluster();
    let mut o = RedisOptions::default();
    o.key_ttl = None;
    let errors = redeem_through_a_reshard(&nodes, o);
    eprintln!("store errors during the reshard (repeated): {errors}");
}

/// Three primaries, each with one replica (nodes 3, 4, 5 replicate 0, 1,
/// 2), once every replica is linked.
fn cluster_with_replicas() -> Vec<RedisServer> {
    let nodes = cluster_of(6);
    for i in 0..3 {
        let primary = node_id(&nodes[i]);
        let replica = &nodes[i + 3];
        replica.wait_until("the primary is known", Duration::from_secs(20), || {
            text(replica.cmd(&["CLUSTER", "REPLICATE", &primary])) == "OK"
        });
    }
    for replica in &nodes[3..] {
        replica.wait_until("master_link_status:up", Duration::from_secs(20), || {
            replica
                .cmd(&["INFO", "replication"])
                .text()
                .is_some_and(|i| i.contains("master_link_status:up"))
        });
    }
    nodes
}

/// The same reshard with `wait_replicas = 1`: the write and its WAIT are
/// one pipeline, whose redirections the store follows itself (ASKING to
/// the importing node, a routed read after MOVED), so the WAIT always
/// reaches the node that took the write.
#[test]
fn a_live_reshard_with_waited_writes_loses_no_rotation_and_gives_no_wrong_answer() {
    let nodes = cluster_with_replicas();
    let mut o = RedisOptions::default();
    o.key_ttl = None;
    o.wait_replicas = 1;
    let errors = redeem_through_a_reshard(&nodes[..3], o);
    eprintln!("store errors during the reshard (repeated): {errors}");
}

/// `wait_replicas` on a cluster: the WAIT goes to the node that took the
/// write. With node 0's replica stopped, the writes of families on node 0
/// fall short (a store error naming the shortfall) and those on the other
/// nodes, whose replicas are up, are answered; a WAIT sent to every
/// primary, or to another node, would fail them all or pass them all.
#[test]
fn a_waited_write_on_a_cluster_waits_on_the_node_that_took_it() {
    let mut nodes = cluster_with_replicas();
    let urls: Vec<String> = nodes[..3].iter().map(|n| n.url()).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let mut o = RedisOptions::default();
    o.key_ttl = None;
    o.wait_replicas = 1;
    let engine = Engine::builder()
        .keys(KeyRing::new(KeyId(1), &KeySecret::generate().unwrap()))
        .policies(
            PolicySet::builder()
                .client(CLIENT, PolicyOverrides::new())
                .build()
                .unwrap(),
        )
        .shared_store(RedisStore::connect_cluster(&urls, o).unwrap())
        .build()
        .unwrap();
    let t0 = Timestamp::from_secs(1_700_000_000);
    let tokens: Vec<_> = (0..24)
        .map(|i| {
            engine
                .at(t0)
                .issue(&IssueRequest {
                    client: CLIENT,
                    subject: &format!("user-{i}"),
                    scope: "openid",
                    ip: None,
                })
                .unwrap()
                .accepted()
                .unwrap()
                .token
        })
        .collect();
    nodes[3].stop();
    let (mut short, mut served) = (0, 0);
    for t in &tokens {
        let id = engine.at(t0).introspect(t.as_str()).unwrap().family;
        let slot = match nodes[1].cmd(&["CLUSTER", "KEYSLOT", &format!("rg:f:{{{id}}}")]) {
            Reply::Int(s) => s,
            other => panic!("{other:?}"),
        };
        let on_node_0 = slot <= 5460;
        let started = Instant::now();
        let r = engine
            .at(t0)
            .redeem(&RedeemRequest::new(t.as_str(), CLIENT));
        assert!(started.elapsed() < Duration::from_secs(2));
        match r {
            Err(refresh_guard::Error::Store { detail, .. }) if on_node_0 => {
                assert!(detail.contains("0 of 1 replicas"), "{detail}");
                short += 1;
            }
            Ok(d) if !on_node_0 => {
                assert_eq!(d.accepted().map(|a| a.kind), Some(AcceptKind::Rotated));
                served += 1;
            }
            other => panic!("family on node 0: {on_node_0}: {other:?}"),
        }
    }
    assert!(short > 0 && served > 0, "{short} short, {served} served");
}
