//! The property-bag decoder (reference §11): decode, apply to a message, and for bags that
//! decode, re-encode and decode again to the same properties.
#![no_main]

use hubmsg_core::{wire, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = wire::parse_c2d_topic(text);
    let _ = wire::parse_d2c_topic(text);
    if let Ok(bag) = wire::decode_bag(text) {
        let again = wire::decode_bag(&wire::encode_bag(&bag)).expect("an encoded bag decodes");
        assert_eq!(again, bag, "encode/decode round trip");
        let mut m = Message::new(Vec::new());
        if wire::apply_bag(&mut m, bag).is_ok() {
            let _ = wire::d2c_bag(&m);
            let _ = wire::c2d_bag(&m);
        }
    }
});
