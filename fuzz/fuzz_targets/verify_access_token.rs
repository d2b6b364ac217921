//! Opaque access tokens presented to resource servers: refused unless real, nothing changed,
//! a parsed token spells itself back and is never a refresh token or a code.
//! The body is `refresh_guard::fuzzing::verify_access_token`, which the corpus replay tests call too (FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| refresh_guard::fuzzing::verify_access_token(data));
