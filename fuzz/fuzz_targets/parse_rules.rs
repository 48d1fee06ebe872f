//! The rules-file parser on arbitrary text: it never panics, and a refusal
//! names the file.
#![no_main]

use std::path::Path;

use holdclear::rules::Rules;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Rules::parse(text, Path::new("fuzz.toml")) {
        Ok(rules) => {
            assert!(!rules.hash().is_empty());
        }
        Err(e) => {
            assert!(e.to_string().contains("fuzz.toml"), "{e}");
        }
    }
});
