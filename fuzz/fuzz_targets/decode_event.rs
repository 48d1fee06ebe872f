//! The held-order decoder on arbitrary bytes: it never panics, a refusal
//! names a dead-letter code and a one-line detail (it becomes the
//! `x-holdclear-error-detail` header), and an accepted event survives its
//! own serialisation (it is stored as JSON).
#![no_main]

use holdclear::domain::HeldOrderEvent;
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    match HeldOrderEvent::decode(data, LIMIT) {
        Ok(event) => {
            let stored = serde_json::to_value(&event).expect("an event serialises");
            let back: HeldOrderEvent = serde_json::from_value(stored).expect("and reads back");
            assert_eq!(back, event);
        }
        Err(e) => {
            assert!(!e.detail.is_empty(), "{e:?}");
            assert!(!e.detail.contains('\n') && !e.detail.contains('\r'), "{e:?}");
        }
    }
});
