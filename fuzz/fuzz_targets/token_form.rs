//! Request bodies of the token, revocation and introspection endpoints: the
//! form parser must never panic, and what it accepts holds each parameter
//! once, with a non-empty value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refresh_guard_server::fuzzing::parse_form;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = parse_form(data) {
        let names: Vec<&str> = f.names().collect();
        assert_eq!(names.len(), f.len());
        for (i, n) in names.iter().enumerate() {
            assert!(!names[..i].contains(n), "{n} twice");
            assert!(f.get(n).is_some_and(|v| !v.is_empty()));
        }
    }
});
