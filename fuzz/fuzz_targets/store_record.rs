//! Store records read back from disk: never a panic, and re-encoding is stable.
//! The body is `refresh_guard::fuzzing::store_record`, which the corpus replay tests call too (FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| refresh_guard::fuzzing::store_record(data));
