//! Untrusted refresh tokens: any string must be denied or accepted without
//! panicking, and a string that is not a real token must change nothing.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use refresh_guard::RedeemRequest;
use refresh_guard::{DenyReason, Engine, IssueRequest};

fn engine() -> &'static (Engine, String) {
    static E: OnceLock<(Engine, String)> = OnceLock::new();
    E.get_or_init(|| {
        let e = Engine::builder().build().expect("engine");
        let t = e
            .issue(&IssueRequest {
                client: "c",
                subject: "s",
                scope: "",
                ip: Some("10.0.0.1".parse().expect("ip")),
            })
            .expect("issue")
            .accepted()
            .expect("issued")
            .token;
        let s = t.as_str().to_owned();
        (e, s)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (e, real) = engine();
    if s == real {
        return;
    }
    let before = e.stats().families;
    let d = e.redeem(&RedeemRequest::new(s, "c").ip("10.0.0.1".parse::<std::net::IpAddr>().expect("ip"))).expect("no store");
    assert_eq!(d.deny_reason(), Some(DenyReason::InvalidToken));
    assert!(e.introspect(s).is_none());
    assert_eq!(e.stats().families, before);
});
