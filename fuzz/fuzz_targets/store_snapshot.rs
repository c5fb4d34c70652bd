//! Snapshot, sidecar index and ack watermark decoding over arbitrary bytes: never panics; a
//! snapshot decodes only when its checksum covers what it claims (covered_seq and length
//! included): a decoded current-version snapshot re-encodes to the same bytes, an encoded one
//! decodes back, and flipping any bit of its header or body makes it fail.
#![no_main]

use hubmsg_core::store::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::decode_index(data);
    let _ = fuzzing::decode_ack(data);
    if let Ok((covered, len)) = fuzzing::decode_snapshot(data) {
        assert_eq!(len, data.len() - 28);
        if data.starts_with(b"HMSNAP02") {
            assert_eq!(fuzzing::encode_snapshot(covered, &data[28..]), data, "a decoded snapshot is exactly what the store writes");
        }
    }
    let covered = data.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let body = data.get(8..).unwrap_or(&[]);
    let snap = fuzzing::encode_snapshot(covered, body);
    assert_eq!(fuzzing::decode_snapshot(&snap), Ok((covered, body.len())));
    // One flipped bit anywhere after the magic: in covered_seq, the length, the CRC or the body.
    let bit = data.first().map_or(0, |b| *b as usize) + body.len();
    let at = 8 + bit / 8 % (snap.len() - 8);
    let mut bad = snap.clone();
    bad[at] ^= 1 << (bit % 8);
    assert!(fuzzing::decode_snapshot(&bad).is_err(), "a snapshot with bit {} of byte {at} flipped decoded", bit % 8);
});
