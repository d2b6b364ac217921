//! `X-Forwarded-For` chains behind a trusted proxy: the client is an untrusted hop or none.
//! The body is `refresh_guard_server::fuzzing::forwarded_for`, which the corpus replay tests call too (FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| refresh_guard_server::fuzzing::forwarded_for(data));
