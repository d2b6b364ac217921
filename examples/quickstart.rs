//! One token family walked through its life: issue, rotation, a grace
//! replay, reuse detection and revocation, and an IP denial.
//!
//! Run: `cargo run --release --example quickstart`

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use refresh_guard::RedeemRequest;
use refresh_guard::{
    Decision, Engine, IssueRequest, ManualClock, MemorySink, PolicyOverrides, PolicySet, Timestamp,
};

fn show(step: &str, d: &Decision) {
    match d {
        Decision::Accept(a) => println!(
            "{step:<44} -> accept ({}), generation {}, next token {}…  [policy {}]",
            a.kind.as_str(),
            a.generation,
            &a.token[..12],
            a.policy_version
        ),
        Decision::Deny(d) => println!(
            "{step:<44} -> deny {} ({}: \"{}\")  [policy {}]",
            d.reason,
            d.reason.oauth_error().as_str(),
            d.reason.description(),
            d.policy_version
        ),
    }
}

fn main() -> Result<(), refresh_guard::Error> {
    let policies = PolicySet::builder()
        .client(
            "mobile-app",
            PolicyOverrides::new()
                .grace_period(Duration::from_secs(10))
                .ip_allowlist(vec![
                    "10.0.0.0/8".parse().expect("valid CIDR"),
                    "2001:db8::/32".parse().expect("valid CIDR"),
                ]),
        )
        .build()?;
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_767_225_600)));
    let events = Arc::new(MemorySink::new());
    let engine = Engine::builder()
        .policies(policies)
        .clock(clock.clone())
        .events(events.clone())
        .build()?;

    let home: IpAddr = "10.1.2.3".parse().expect("valid IP");
    let abroad: IpAddr = "198.51.100.7".parse().expect("valid IP");
    let client = "mobile-app";

    let d = engine.issue(&IssueRequest {
        client,
        subject: "user-42",
        scope: "openid offline_access",
        ip: Some(home),
    })?;
    show("issue a family", &d);
    let t1 = d.accepted().expect("issued").token;

    clock.advance(Duration::from_secs(60));
    let d = engine.redeem(&RedeemRequest::new(&t1, client).ip(home))?;
    show("refresh with t1 (rotate)", &d);
    let t2 = d.accepted().expect("rotated").token;

    clock.advance(Duration::from_secs(2));
    let d = engine.redeem(&RedeemRequest::new(&t1, client).ip(home))?;
    show("retry t1 after a lost response (grace)", &d);
    assert_eq!(d.accepted().expect("grace").token, t2, "same successor");

    let d = engine.redeem(&RedeemRequest::new(&t2, client).ip(abroad))?;
    show("refresh t2 from outside the allow-list", &d);

    clock.advance(Duration::from_secs(60));
    let d = engine.redeem(&RedeemRequest::new(&t2, client).ip(home))?;
    show("refresh t2 from home (rotate)", &d);
    let t3 = d.accepted().expect("rotated").token;

    let d = engine.redeem(&RedeemRequest::new(&t1, client).ip(abroad))?;
    show("attacker replays stolen t1 (reuse)", &d);

    let d = engine.redeem(&RedeemRequest::new(&t3, client).ip(home))?;
    show("the owner's t3 after the reuse", &d);

    println!("\nevents:");
    for e in events.take() {
        println!(
            "  {:<16} family={} client={} subject={} ip={} policy={} at={}",
            e.kind.as_str(),
            e.family.map(|f| f.to_string()).unwrap_or_default(),
            e.client.as_deref().unwrap_or("-"),
            e.subject.as_deref().unwrap_or("-"),
            e.ip.map(|i| i.to_string()).unwrap_or_default(),
            e.policy_version,
            e.at,
        );
    }
    Ok(())
}
