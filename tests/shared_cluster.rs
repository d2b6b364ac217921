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
    let nodes: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::options().cluster().start())
        .collect();
    let ranges = [("0", "5460"), ("5461", "10922"), ("10923", "16383")];
    for (node, (from, to)) in nodes.iter().zip(ranges) {
        assert_eq!(
            text(node.cmd(&["CLUSTER", "ADDSLOTSRANGE", from, to])),
            "OK"
        );
    }
    for node in &nodes[1..] {
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
                i.contains("cluster_state:ok") && i.contains("cluster_known_nodes:3")
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
    // A client scan is one server's: refused on a cluster, naming it.
    assert!(matches!(
        engines[0].revoke_client(CLIENT),
        Err(refresh_guard::Error::InvalidArgument {
            name: "revoke_client",
            ..
        })
    ));
}
