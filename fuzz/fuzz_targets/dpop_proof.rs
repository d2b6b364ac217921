//! DPoP proofs at the token endpoint: never a panic, never a replay, a refusal changes nothing.
//! The body is `refresh_guard_server::fuzzing::dpop_proof`, which the corpus replay tests call too (FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| refresh_guard_server::fuzzing::dpop_proof(data));
