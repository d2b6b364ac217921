//! Policy files written by operators: never a panic, every refusal names a file.
//! The body is `refresh_guard::fuzzing::policy_toml`, which the corpus replay tests call too (FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| refresh_guard::fuzzing::policy_toml(data));
