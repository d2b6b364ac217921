//! Bytes per live family, from the process's resident set (not a size_of
//! estimate): table, subject index and per-family strings included.
//!
//! Run: `cargo run --release --example memory -- 1000000`

use std::net::IpAddr;

use refresh_guard::{Engine, IssueRequest};

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
    let engine = Engine::builder().build()?;
    let ip: IpAddr = "10.0.0.1".parse().expect("ip");
    let mut subject = String::new();
    let before = rss_bytes();
    for i in 0..n {
        use std::fmt::Write;
        subject.clear();
        write!(subject, "user-{i:08}").expect("write to String");
        // Tokens are dropped: the client keeps them, not the server.
        engine.issue(&IssueRequest {
            client: "app",
            subject: &subject,
            scope: "openid offline_access",
            ip: Some(ip),
        })?;
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
    Ok(())
}
