//! Store records read back from disk: decoding arbitrary bytes must never
//! panic (it returns `None` for anything that is not exactly one record).
#![no_main]

use libfuzzer_sys::fuzz_target;
use refresh_guard::StoredRecord;

fuzz_target!(|data: &[u8]| {
    let _ = StoredRecord::decode(data, 1);
});
