//! Policy files written by operators: the loader must never panic, and every
//! refusal names the file at fault.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use refresh_guard::PolicySet;

fuzz_target!(|texts: (&str, &str)| {
    let files = [
        (Path::new("a.toml"), texts.0),
        (Path::new("b.toml"), texts.1),
    ];
    if let Err(errors) = PolicySet::from_toml(&files) {
        assert!(!errors.is_empty());
        for e in errors.errors() {
            assert!(files.iter().any(|(p, _)| e.path == *p), "{e}");
        }
    }
});
