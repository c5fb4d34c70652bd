//! Decoding of the store's small files from arbitrary bytes: snapshots, segment sidecar
//! indexes and the ack watermark. Each is either decoded or refused, never a panic.
#![no_main]

use hubmsg_core::store::fuzzing::{decode_ack, decode_index, decode_snapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, body)) = decode_snapshot(data) {
        assert!(body <= data.len(), "snapshot body longer than the file");
    }
    if let Some((first, last, _)) = decode_index(data) {
        let _ = (first, last);
    }
    let _ = decode_ack(data);
});
