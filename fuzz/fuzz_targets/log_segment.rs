//! A whole mutated log segment: the store recovers exactly its checksummed prefix or
//! refuses with `Error::Corrupt` at that prefix's end, file untouched.
//! The body is `refresh_guard::fuzzing::log_segment`, which the corpus replay tests call too (FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| refresh_guard::fuzzing::log_segment(data));
