//! Refresh tokens presented by clients: denied `invalid_token` unless real, nothing changed,
//! and a parsed token spells itself back.
//! The body is `refresh_guard::fuzzing::redeem_token`, which the corpus replay tests call too (FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| refresh_guard::fuzzing::redeem_token(data));
