//! Request bodies of the OAuth endpoints: each parameter once, non-empty, and a round trip.
//! The body is `refresh_guard_server::fuzzing::token_form`, which the corpus replay tests call too (FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| refresh_guard_server::fuzzing::token_form(data));
