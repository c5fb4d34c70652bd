//! Store frame recovery from arbitrary segment bytes: the scan a log runs when it opens a
//! segment (valid prefix, the first bad frame, the frames recovered after it) never panics and
//! never reports more than it was given.
#![no_main]

use hubmsg_core::store::fuzzing::scan_segment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes choose the segment's first sequence number, the rest is the segment.
    let (seq, bytes) = match data.split_first_chunk::<8>() {
        Some((s, rest)) => (u64::from_le_bytes(*s), rest),
        None => (1, data),
    };
    for max in [64usize, 4096, 1 << 20] {
        let s = scan_segment(bytes, seq, max);
        assert!(s.good_len as usize <= bytes.len(), "valid prefix longer than the segment: {s:?}");
        if let Some(bad) = s.bad_offset {
            assert!(bad as usize <= bytes.len() && bad >= s.good_len, "bad offset outside the segment: {s:?}");
        } else {
            assert_eq!(s.valid_after, 0, "records after a bad spot that does not exist: {s:?}");
        }
    }
});
