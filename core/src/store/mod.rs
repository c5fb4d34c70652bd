//! The one durable storage engine: a segmented append-only log ([`Log`]) and event-sourced state
//! with snapshot compaction on top of it ([`StateLog`]). Used for the device outbox, the hub's
//! D2C partitions, C2D queues, feedback, consumer checkpoints and the identity registry.
//!
//! On-disk format, recovery rules and durability promises: `docs/storage.md`.
//!
//! - **One I/O seam.** Every file operation goes through the `Fs` / `FileIo` traits (`io.rs`);
//!   the tests run the engine on a simulated machine that loses power at random points
//!   (unsynced writes and directory entries vanish or survive torn by sector, fdatasync fails
//!   with EIO, writes with ENOSPC) and check what every durability level promises.
//! - **A bounded pool of writer threads** per process (16 by default, `HUBMSG_STORE_THREADS`)
//!   does the writes, fdatasyncs, ack files and compactions of every log, however many are open.
//! - **Back-pressure.** Each log bounds the bytes appended but not yet written
//!   ([`LogOptions::max_pending_bytes`], 64 MiB by default). [`Log::append`] never blocks: past
//!   the bound it fails with `QueueFull`; a producer that would rather wait awaits
//!   [`Log::wait_for_room`] (or checks [`Log::has_room`]) and appends again. Both fail with
//!   `Storage` instead of waiting when the log cannot take appends at all (damaged, a failing
//!   disk, below the disk reserve), so callers can refuse work instead of hanging.
//! - **Locking.** A log directory is locked by its opener (`flock` on `DIR/lock`, which names
//!   the holder's pid): a second opener, in this process or another, gets a `Storage` error.
//! - **Damage** is never silently cut: see [`Damage`], [`check`] and [`OnDamage`].

pub mod check;
pub(crate) mod exec;
mod format;
pub(crate) mod io;
mod log;
mod recover;
mod state;

#[cfg(test)]
mod powerloss;
#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod sim;

pub use exec::release_threads;
pub(crate) use log::Env;
pub use log::{Durability, Log, LogOptions, LogStats, OnDamage, Record, SegmentInfo};
pub use recover::{Damage, DamageKind};
pub use state::{Machine, StateLog, StateOptions};

/// Pure decoders of the on-disk formats, for the fuzz targets (`fuzz/`). Each accepts arbitrary
/// bytes and never panics.
#[doc(hidden)]
pub mod fuzzing {
    use super::format;

    /// What [`scan_segment`] found.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct SegmentScan {
        /// Records in the valid prefix.
        pub records: u64,
        /// Bytes of the valid prefix.
        pub good_len: u64,
        /// Offset of the first bad byte, if any.
        pub bad_offset: Option<u64>,
        /// Valid records found after the bad bytes.
        pub valid_after: u64,
        /// Whether a later record attests the bad one had been fsync'd (damage, not a torn write).
        pub attested: bool,
        /// Whether the bytes are in the old segment format (no segment header, 24-byte frame
        /// headers), which opening rewrites once in the current one.
        pub v1: bool,
    }

    /// Scans arbitrary bytes as a segment whose first record is `first_seq`, recovering the
    /// frames after any bad spot, as opening a log does.
    pub fn scan_segment(bytes: &[u8], first_seq: u64, max_record: usize) -> SegmentScan {
        summarize(&format::scan(bytes, first_seq, max_record.max(1)))
    }

    fn summarize(s: &format::Scan) -> SegmentScan {
        SegmentScan {
            records: s.count,
            good_len: s.good_len,
            bad_offset: s.bad.as_ref().map(|b| b.offset),
            valid_after: s.bad.as_ref().map_or(0, |b| b.valid_after()),
            attested: s.bad.as_ref().is_some_and(|b| b.attested()),
            v1: s.version == format::Version::V1,
        }
    }

    /// One frame recovery keeps: the good prefix's records and the valid records found after a
    /// bad spot.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct KeptFrame {
        /// Sequence number.
        pub seq: u64,
        /// File offset of the frame's header.
        pub offset: usize,
        /// The payload's position in the bytes.
        pub body: std::ops::Range<usize>,
        /// Whether the segment is in the old format (24-byte headers, no segment header).
        pub v1: bool,
        /// Whether it lies after the first bad spot.
        pub after_bad: bool,
    }

    /// Every frame [`scan_segment`] counts, in file order: what a log opened on these bytes
    /// can ever serve (the good prefix) or keep by quarantine (the records after a bad spot).
    pub fn kept_frames(bytes: &[u8], first_seq: u64, max_record: usize) -> Vec<KeptFrame> {
        recover_frames(bytes, first_seq, max_record).1
    }

    /// [`scan_segment`] and [`kept_frames`] from one scan of the bytes.
    pub fn recover_frames(bytes: &[u8], first_seq: u64, max_record: usize) -> (SegmentScan, Vec<KeptFrame>) {
        let max = max_record.max(1);
        let s = format::scan(bytes, first_seq, max);
        let v1 = s.version == format::Version::V1;
        let mut out = Vec::new();
        let mut frames_in = |start: usize, end: usize, after_bad: bool| {
            let mut pos = start;
            while pos < end {
                let f = format::parse_frame(bytes, pos, s.version, max).expect("a counted frame parses");
                out.push(KeptFrame { seq: f.seq, offset: pos, body: f.body.clone(), v1, after_bad });
                pos = f.end();
            }
        };
        let start = if s.count == 0 { s.good_len as usize } else { s.version.data_start() as usize };
        frames_in(start, s.good_len as usize, false);
        for r in s.bad.iter().flat_map(|b| &b.after) {
            frames_in(r.start as usize, r.end as usize, true);
        }
        (summarize(&s), out)
    }

    /// The file name of the segment whose first record is `first_seq` (in a log directory).
    pub fn segment_file_name(first_seq: u64) -> String {
        super::recover::segment_name(first_seq)
    }

    /// The 16-byte header a segment starts with (for seed inputs).
    pub fn segment_header(first_seq: u64) -> Vec<u8> {
        format::segment_header(first_seq).to_vec()
    }

    /// Appends one frame as the log writes it (for seed inputs and round trips).
    pub fn encode_frame(out: &mut Vec<u8>, seq: u64, ts: u64, synced: u64, payload: &[u8]) {
        format::encode_frame(out, seq, ts, synced, payload)
    }

    /// Decodes a snapshot file: `(covered_seq, body length)`.
    pub fn decode_snapshot(bytes: &[u8]) -> Result<(u64, usize), String> {
        format::decode_snapshot(bytes).map(|(c, b)| (c, b.len()))
    }

    /// Encodes a snapshot as the store writes it (the current version).
    pub fn encode_snapshot(covered_seq: u64, body: &[u8]) -> Vec<u8> {
        format::encode_snapshot(covered_seq, body)
    }

    /// Decodes a segment's sidecar index: `(first_seq, last_seq, entries)`.
    pub fn decode_index(bytes: &[u8]) -> Option<(u64, u64, usize)> {
        format::decode_index(bytes).map(|i| (i.first_seq, i.last_seq, i.entries.len()))
    }

    /// Decodes an ack watermark file: `(counter, watermark)`.
    pub fn decode_ack(bytes: &[u8]) -> Result<(u64, u64), String> {
        format::decode_ack(bytes)
    }

    /// A log directory on the simulated machine of the power-loss tests (`store/sim.rs`)
    /// instead of the real file system, through the same I/O seam, with the deterministic
    /// inline executor: the store's whole open/recover/read path at memory speed, for the fuzz
    /// targets. The machine never loses power here.
    #[cfg(any(test, feature = "fuzzing"))]
    pub struct MemDir {
        sim: super::sim::Sim,
        dir: std::path::PathBuf,
    }

    #[cfg(any(test, feature = "fuzzing"))]
    impl Default for MemDir {
        fn default() -> MemDir {
            MemDir::new()
        }
    }

    #[cfg(any(test, feature = "fuzzing"))]
    impl MemDir {
        /// An empty directory `/log` on a fresh machine.
        pub fn new() -> MemDir {
            let dir = std::path::PathBuf::from("/log");
            MemDir { sim: super::sim::Sim::new(1, &dir), dir }
        }

        /// Writes `bytes` as the file `name` of the directory, durably (fsync'd, as is its
        /// directory entry).
        pub fn write(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
            let fs = self.sim.fs();
            let f = fs.open(&self.dir.join(name), true, 0o644)?;
            f.set_len(0)?;
            f.write_at(bytes, 0)?;
            f.sync_data()?;
            fs.sync_dir(&self.dir)
        }

        /// The size of the file `name`, if it exists.
        pub fn len(&self, name: &str) -> Option<u64> {
            self.sim.fs().open(&self.dir.join(name), false, 0o644).ok()?.len().ok()
        }

        /// The contents of the file `name`, if it exists.
        pub fn read(&self, name: &str) -> Option<Vec<u8>> {
            super::io::read_file(&*self.sim.fs(), &self.dir.join(name)).ok().flatten()
        }

        /// Opens a log on the directory, as [`crate::store::Log::open`] does on a real one.
        pub fn open_log(&self, opts: super::LogOptions) -> crate::Result<super::Log> {
            let (env, _inline) = self.sim.env();
            super::Log::open_with(&self.dir, opts, env)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_log_in_a_memory_directory_recovers_like_one_on_disk() {
            // The same damaged segment on the real file system and in memory: both logs serve
            // the same prefix and leave the segment the same length.
            let mut seg = format::segment_header(1).to_vec();
            for s in 1..=20u64 {
                format::encode_frame(&mut seg, s, s, s - 1, format!("record {s}").as_bytes());
            }
            seg.extend_from_slice(b"torn tail");
            let name = segment_file_name(1);
            let opts = || super::super::LogOptions { durability: super::super::Durability::Never, ..Default::default() };
            let real = tempfile::tempdir().unwrap();
            std::fs::write(real.path().join(&name), &seg).unwrap();
            let mem = MemDir::new();
            mem.write(&name, &seg).unwrap();
            let a = super::super::Log::open(real.path(), opts()).unwrap();
            let b = mem.open_log(opts()).unwrap();
            let (ra, rb) = (a.read(1, 100, usize::MAX).unwrap(), b.read(1, 100, usize::MAX).unwrap());
            assert_eq!(ra.len(), 20);
            assert_eq!(
                ra.iter().map(|r| (r.seq, r.payload.clone())).collect::<Vec<_>>(),
                rb.iter().map(|r| (r.seq, r.payload.clone())).collect::<Vec<_>>()
            );
            a.close().unwrap();
            b.close().unwrap();
            let on_disk = std::fs::metadata(real.path().join(&name)).unwrap().len();
            assert_eq!(mem.len(&name), Some(on_disk));
            assert_eq!(on_disk, seg.len() as u64 - 9, "the torn tail was cut");
            assert_eq!(mem.read(&name).unwrap(), std::fs::read(real.path().join(&name)).unwrap());
        }

        #[test]
        fn decoders_survive_arbitrary_bytes() {
            let mut rng = fastrand::Rng::with_seed(7);
            for n in 0..2000usize {
                let len = n % 300;
                let b: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                let s = scan_segment(&b, rng.u64(..), 1 << 16);
                assert!(s.good_len as usize <= b.len());
                let _ = decode_snapshot(&b);
                let _ = decode_index(&b);
                let _ = decode_ack(&b);
            }
            // A valid segment with a flipped byte in the middle is reported with what follows.
            let mut seg = format::segment_header(1).to_vec();
            for s in 1..=50u64 {
                format::encode_frame(&mut seg, s, s, s - 1, b"0123456789");
            }
            let mid = seg.len() / 2;
            seg[mid] ^= 1;
            let s = scan_segment(&seg, 1, 1024);
            assert!(s.bad_offset.is_some() && s.valid_after > 0 && s.attested, "{s:?}");
            let kept = kept_frames(&seg, 1, 1024);
            assert_eq!(kept.len() as u64, s.records + s.valid_after, "every counted frame is listed");
            assert_eq!(recover_frames(&seg, 1, 1024), (s.clone(), kept.clone()), "one scan gives both");
            assert_eq!(kept.iter().filter(|f| !f.after_bad).count() as u64, s.records);
            assert!(kept.iter().all(|f| &seg[f.body.clone()] == b"0123456789"));
            assert!(kept.windows(2).all(|w| w[0].seq < w[1].seq && w[0].body.end <= w[1].offset));
        }

        #[test]
        fn snapshots_round_trip_and_a_changed_covered_seq_fails_the_checksum() {
            let snap = encode_snapshot(41, b"{\"state\":1}");
            assert_eq!(decode_snapshot(&snap), Ok((41, 11)));
            let mut bad = snap.clone();
            bad[8] ^= 1; // covered_seq
            assert!(decode_snapshot(&bad).is_err());
            assert_eq!(segment_file_name(1), "00000000000000000001.seg");
        }
    }
}
