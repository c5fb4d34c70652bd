//! Connection-string parsing: never panics, and whatever parses formats back to a string that
//! parses to the same value.
#![no_main]

use hubmsg_core::auth::ConnectionString;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cs) = ConnectionString::parse(text) {
        let again = ConnectionString::parse(&cs.to_string()).expect("a formatted connection string parses");
        assert_eq!(again, cs);
        let _ = (cs.host(), cs.port());
        let _ = hubmsg_core::DeviceOptions::from_connection_string(text);
        let _ = hubmsg_core::service::ServiceOptions::from_connection_string(text);
    }
});
