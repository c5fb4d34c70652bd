//! Segment frame recovery over arbitrary bytes (docs/storage.md, recovery rules): never panics;
//! every frame recovery keeps passes its checksum, computed here independently of the store's
//! code; the good prefix is dense from the first sequence number; and a log opened on the
//! bytes (as its only, last segment) serves exactly that prefix and leaves the file as it was,
//! except that it cuts a torn tail at the bad spot (bad bytes that no later valid record
//! attests as fsync'd, rule 1) and rewrites an old-format segment in the current format — never
//! a cut when a later record attests the bad one (rule 2). The log runs on the store's simulated
//! file system (`store::fuzzing::MemDir`, the same I/O seam as the real one) so a campaign
//! reaches 10,000,000 executions; `core`'s `a_log_in_a_memory_directory_recovers_like_one_on_disk`
//! checks that it recovers as a log on disk does.
#![no_main]

use hubmsg_core::store::fuzzing::{self, KeptFrame, MemDir};
use hubmsg_core::store::{Durability, LogOptions};
use hubmsg_core::ErrorKind;
use libfuzzer_sys::fuzz_target;

const MAX_RECORD: usize = 4096;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The frame layout of docs/storage.md: length u32, CRC-32C u32, seq u64, timestamp u64,
/// (v2) synced_through u64, payload; the CRC covers everything after itself.
fn check_frame(data: &[u8], f: &KeptFrame) {
    let header = if f.v1 { 24 } else { 32 };
    assert_eq!(f.body.start, f.offset + header, "{f:?}: the payload follows the header");
    assert_eq!(f.body.len(), u32_at(data, f.offset) as usize, "{f:?}: the length field");
    assert!(f.body.len() <= MAX_RECORD, "{f:?}: longer than the record limit");
    assert_eq!(u64_at(data, f.offset + 8), f.seq, "{f:?}: the sequence number field");
    let crc = crc32c::crc32c_append(crc32c::crc32c(&data[f.offset + 8..f.offset + header]), &data[f.body.clone()]);
    assert_eq!(crc, u32_at(data, f.offset + 4), "{f:?}: a kept record fails its checksum");
}

fuzz_target!(|data: &[u8]| {
    let (scan, kept) = fuzzing::recover_frames(data, 1, MAX_RECORD);
    assert!(scan.good_len as usize <= data.len(), "{scan:?}");
    assert_eq!(scan.bad_offset.is_none(), scan.good_len as usize == data.len(), "{scan:?}: a bad spot exactly when bytes are left over");
    let prefix: Vec<&KeptFrame> = kept.iter().filter(|f| !f.after_bad).collect();
    assert_eq!(prefix.len() as u64, scan.records);
    assert_eq!(kept.len() as u64 - scan.records, scan.valid_after);
    for (i, f) in prefix.iter().enumerate() {
        assert_eq!(f.seq, 1 + i as u64, "the good prefix is dense");
    }
    for f in &kept {
        check_frame(data, f);
    }
    for w in kept.windows(2) {
        assert!(w[0].seq < w[1].seq && w[0].body.end <= w[1].offset, "kept frames are in order and apart: {w:?}");
    }

    // The store's recovery, through its I/O seam, on an in-memory file system.
    let dir = MemDir::new();
    let seg = fuzzing::segment_file_name(1);
    dir.write(&seg, data).unwrap();
    let opts = LogOptions { durability: Durability::Never, max_record_bytes: MAX_RECORD, ..LogOptions::default() };
    if let Ok(log) = dir.open_log(opts) {
        let mut served = Vec::new();
        let mut from = 1;
        loop {
            let batch = match log.read(from, 1024, usize::MAX) {
                Ok(b) => b,
                Err(e) => {
                    // Rule 2: a read into the damage is a Storage error, never bad data.
                    assert_eq!(e.kind(), ErrorKind::Storage, "{e}");
                    assert!(scan.bad_offset.is_some(), "a read failed on a log without damage: {e}");
                    break;
                }
            };
            let Some(last) = batch.last() else { break };
            from = last.seq + 1;
            served.extend(batch);
        }
        assert_eq!(served.len(), prefix.len(), "the log serves exactly the good prefix");
        for (r, f) in served.iter().zip(&prefix) {
            assert_eq!((r.seq, &r.payload[..]), (f.seq, &data[f.body.clone()]), "a served record is the stored one");
        }
        let _ = log.close();
    }
    let len = dir.len(&seg).unwrap_or(0);
    let v1_damage = scan.v1 && scan.valid_after > 0; // old frames attest nothing: kept as damage
    let cut = scan.bad_offset.is_some() && !scan.attested && !v1_damage;
    let expected = if scan.v1 && !v1_damage {
        // Rewritten in the current format: segment header + 32-byte frame headers, prefix only.
        16 + prefix.iter().map(|f| 32 + f.body.len() as u64).sum::<u64>()
    } else if cut {
        scan.good_len
    } else {
        data.len() as u64
    };
    assert_eq!(
        len,
        expected,
        "the segment went from {} to {len} bytes (good prefix {}, bad spot {:?}, {} valid records after it, attested {}, v1 {})",
        data.len(),
        scan.good_len,
        scan.bad_offset,
        scan.valid_after,
        scan.attested,
        scan.v1
    );
});
