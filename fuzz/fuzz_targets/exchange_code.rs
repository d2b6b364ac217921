//! Untrusted authorization codes and verifiers at the exchange.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refresh_guard::{Engine, ExchangeRequest};

fuzz_target!(|data: (&str, Option<&str>, &str)| {
    let (code, verifier, redirect) = data;
    let e = Engine::builder().build().expect("engine");
    let d = e
        .exchange(&ExchangeRequest {
            code,
            code_verifier: verifier,
            client: "c",
            redirect_uri: redirect,
            ip: Some("10.0.0.1".parse().expect("ip")),
            dpop: None,
        })
        .expect("no store");
    assert!(d.accepted().is_none());
});
