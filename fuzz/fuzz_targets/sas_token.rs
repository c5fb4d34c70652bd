//! SAS token parsing and verification: never panics; a token verifies only with its key.
#![no_main]

use hubmsg_core::auth::{self, SasToken};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(t) = SasToken::parse(text) {
        let _ = t.resource_uri();
        let _ = t.verify(KEY, 0);
        let _ = t.verify("not base64", 0);
    }
    let _ = auth::scope_covers(text, "hub/devices/d1");
    if !text.is_empty() {
        if let Ok(token) = auth::generate_sas_token(text, KEY, 1_900_000_000, None) {
            let t = SasToken::parse(&token).expect("a generated token parses");
            assert_eq!(t.resource_uri().unwrap(), text);
            t.verify(KEY, 0).expect("a generated token verifies");
        }
    }
});
