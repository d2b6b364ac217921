//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use refresh_guard::{
    Engine, IssueRequest, ManualClock, MemorySink, PolicyOverrides, PolicySet, Timestamp, Token,
};

pub const CLIENT: &str = "mobile-app";
pub const START: Timestamp = Timestamp::from_secs(1_700_000_000);

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub struct Harness {
    pub engine: Engine,
    pub clock: Arc<ManualClock>,
    pub sink: Arc<MemorySink>,
}

impl Harness {
    pub fn new(client_policy: PolicyOverrides) -> Harness {
        Harness::with_set(
            PolicySet::builder()
                .client(CLIENT, client_policy)
                .build()
                .unwrap(),
        )
    }

    pub fn with_set(set: PolicySet) -> Harness {
        let clock = Arc::new(ManualClock::new(START));
        let sink = Arc::new(MemorySink::new());
        let engine = Engine::builder()
            .policies(set)
            .clock(clock.clone())
            .events(sink.clone())
            .build()
            .unwrap();
        Harness {
            engine,
            clock,
            sink,
        }
    }

    pub fn issue_for(&self, subject: &str) -> Token {
        self.engine
            .issue(&IssueRequest {
                client: CLIENT,
                subject,
                scope: "openid offline_access",
                ip: Some(ip("10.0.0.1")),
            })
            .unwrap()
            .accepted()
            .expect("issued")
            .token
    }

    pub fn issue(&self) -> Token {
        self.issue_for("alice")
    }

    pub fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }
}
