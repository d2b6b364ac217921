//! Bytes per live family, from the process's resident set (not a size_of
//! estimate): table, subject index and per-family strings included.
//!
//! Run: `cargo run --release --example memory -- 1000000`; add `dpop` to
//! also bind every family to a DPoP key and report what binding added
//! (docs/design.md "Sender-constrained families").

use std::net::IpAddr;

use refresh_guard::{Dpop, Engine, IssueRequest, Jkt, PolicyOverrides, PolicySet, RedeemRequest};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("resident pages in statm");
    pages * 4096
}

fn main() -> Result<(), refresh_guard::Error> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("family count"))
        .unwrap_or(1_000_000);
    let dpop = std::env::args().nth(2).as_deref() == Some("dpop");
    // `required` binds a live family at its first proof; issuing is the
    // same under either set.
    let policies = PolicySet::builder()
        .defaults(PolicyOverrides::new().dpop(if dpop { Dpop::Required } else { Dpop::Off }))
        .build()?;
    let engine = Engine::builder().policies(policies).build()?;
    let mut tokens = Vec::with_capacity(if dpop { n } else { 0 });
    let ip: IpAddr = "10.0.0.1".parse().expect("ip");
    let mut subject = String::new();
    let before = rss_bytes();
    for i in 0..n {
        use std::fmt::Write;
        subject.clear();
        write!(subject, "user-{i:08}").expect("write to String");
        // Tokens are dropped: the client keeps them, not the server
        // (kept here only to bind the families afterwards).
        let d = engine.issue(&IssueRequest {
            client: "app",
            subject: &subject,
            scope: "openid offline_access",
            ip: Some(ip),
        })?;
        if dpop && let Some(a) = d.accepted() {
            tokens.push(a.token);
        }
    }
    let after = rss_bytes();
    if let Ok(r) = std::fs::read_to_string("/proc/self/smaps_rollup")
        && let Some(l) = r.lines().find(|l| l.starts_with("AnonHugePages:"))
    {
        println!("{l}");
    }
    let per = (after - before) as f64 / n as f64;
    println!(
        "{n} families (one per subject, 13-byte subjects): resident set grew {:.1} MiB = {per:.0} bytes per family",
        (after - before) as f64 / 1048576.0
    );
    if dpop {
        let key = Jkt::from_bytes([0xa1; 32]);
        for t in &mut tokens {
            let d = engine.redeem(&RedeemRequest::new(t, "app").ip(ip).dpop(key))?;
            if let Some(a) = d.accepted() {
                *t = a.token;
            }
        }
        let bound = rss_bytes();
        println!(
            "{} families bound to a DPoP key: resident set grew {:.0} bytes per family more",
            tokens.len(),
            (bound - after) as f64 / tokens.len() as f64
        );
    }
    Ok(())
}
