//! Authorization codes, verifiers and redirect URIs at the exchange: a forged code is
//! denied and changes nothing.
//! The body is `refresh_guard::fuzzing::exchange_code`, which the corpus replay tests call too (FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| refresh_guard::fuzzing::exchange_code(data));
