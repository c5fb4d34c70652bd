//! The on-disk formats of the store, as pure functions over byte slices (no I/O): record frames,
//! segment headers, the scan that recovery and `store check` run over a segment, the sparse index
//! sidecar, the ack watermark file, snapshots and the accepted-holes file. `docs/storage.md`
//! describes every layout; this module is the one place that reads or writes them.
//!
//! Invariants: every decoder accepts arbitrary bytes and answers with a value or a reason,
//! never a panic (they are fuzzed); an encoder's output always decodes to what it was given.

use std::ops::Range;

/// First 8 bytes of a version-2 segment file; followed by the first sequence number (u64 LE).
pub(crate) const SEG_MAGIC: &[u8; 8] = b"HMSEG002";
/// Bytes of a version-2 segment header.
pub(crate) const SEG_HEADER: usize = 16;
/// Frame header of version 1 segments (no segment header): len, crc, seq, timestamp.
pub(crate) const V1_FRAME_HEADER: usize = 24;
/// Frame header of version 2: len, crc, seq, timestamp, synced_through.
pub(crate) const FRAME_HEADER: usize = 32;
/// The sparse index holds the first record and then one record per this many bytes.
pub(crate) const INDEX_STRIDE: u64 = 64 * 1024;

const IDX_MAGIC: &[u8; 8] = b"HMIDX002";
const ACK_MAGIC: &[u8; 8] = b"HMACK002";
/// The two ack slots live in different 512-byte sectors so a torn write damages at most one.
pub(crate) const ACK_SLOT_OFFSETS: [u64; 2] = [0, 512];
const ACK_SLOT: usize = 28;
const SNAP_MAGIC_V1: &[u8; 8] = b"HMSNAP01";
const SNAP_MAGIC_V2: &[u8; 8] = b"HMSNAP02";
const HOLES_MAGIC: &[u8; 8] = b"HMHOLE01";

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The segment format a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// No segment header, 24-byte frame headers (before issue 10). Read, never written.
    V1,
    /// `HMSEG002` header, 32-byte frame headers carrying `synced_through`.
    V2,
}

impl Version {
    /// Bytes before the first frame.
    pub(crate) fn data_start(self) -> u64 {
        match self {
            Version::V1 => 0,
            Version::V2 => SEG_HEADER as u64,
        }
    }
    /// Bytes of a frame header.
    pub(crate) fn frame_header(self) -> usize {
        match self {
            Version::V1 => V1_FRAME_HEADER,
            Version::V2 => FRAME_HEADER,
        }
    }
}

/// The 16-byte header a new segment starts with.
pub(crate) fn segment_header(first_seq: u64) -> [u8; SEG_HEADER] {
    let mut h = [0u8; SEG_HEADER];
    h[..8].copy_from_slice(SEG_MAGIC);
    h[8..].copy_from_slice(&first_seq.to_le_bytes());
    h
}

/// Which format `buf` (a whole segment file) is in. An empty file is a new V2 segment; a file
/// whose first frame parses as V1 is V1; anything else is V2 (with a damaged header if the magic
/// is missing).
pub(crate) fn detect_version(buf: &[u8], max: usize) -> Version {
    if buf.len() >= 8 && &buf[..8] == SEG_MAGIC {
        return Version::V2;
    }
    if !buf.is_empty() && parse_frame(buf, 0, Version::V1, max).is_ok() {
        return Version::V1;
    }
    Version::V2
}

/// Length of the frame of a payload of `len` bytes.
pub(crate) fn frame_len(len: usize) -> usize {
    FRAME_HEADER + len
}

fn crc_v2(header_tail: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header_tail), payload)
}

fn crc_v1(seq: u64, ts: u64, payload: &[u8]) -> u32 {
    let mut h = crc32c::crc32c(&seq.to_le_bytes());
    h = crc32c::crc32c_append(h, &ts.to_le_bytes());
    crc32c::crc32c_append(h, payload)
}

/// Appends a V2 frame. `synced` is the sequence number through which the log was known to be
/// fsync'd when this record was appended (always `< seq`).
pub(crate) fn encode_frame(out: &mut Vec<u8>, seq: u64, ts: u64, synced: u64, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(&synced.to_le_bytes());
    let crc = crc_v2(&out[start + 8..start + FRAME_HEADER], payload);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// A parsed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub seq: u64,
    pub ts: u64,
    /// `synced_through` (0 in V1 frames).
    pub synced: u64,
    /// The payload's position in the buffer.
    pub body: Range<usize>,
}

impl Frame {
    /// Offset just past the frame.
    pub(crate) fn end(&self) -> usize {
        self.body.end
    }
}

/// Why a frame did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BadFrame {
    /// The buffer ends inside the frame.
    Truncated,
    /// The length field exceeds the record limit.
    Length(u32),
    /// The checksum does not match.
    Checksum,
}

impl std::fmt::Display for BadFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadFrame::Truncated => f.write_str("the file ends inside the record"),
            BadFrame::Length(n) => write!(f, "length field {n} exceeds the record limit"),
            BadFrame::Checksum => f.write_str("checksum mismatch"),
        }
    }
}

/// Parses the frame at `buf[pos..]`.
pub(crate) fn parse_frame(buf: &[u8], pos: usize, version: Version, max: usize) -> Result<Frame, BadFrame> {
    let hl = version.frame_header();
    let h = buf.get(pos..pos.checked_add(hl).ok_or(BadFrame::Truncated)?).ok_or(BadFrame::Truncated)?;
    let len = u32_at(h, 0).ok_or(BadFrame::Truncated)?;
    if len as usize > max {
        return Err(BadFrame::Length(len));
    }
    let want = u32_at(h, 4).ok_or(BadFrame::Truncated)?;
    let seq = u64_at(h, 8).ok_or(BadFrame::Truncated)?;
    let ts = u64_at(h, 16).ok_or(BadFrame::Truncated)?;
    let body = pos + hl..pos + hl + len as usize;
    let payload = buf.get(body.clone()).ok_or(BadFrame::Truncated)?;
    let (ok, synced) = match version {
        Version::V1 => (crc_v1(seq, ts, payload) == want, 0),
        Version::V2 => (crc_v2(&h[8..FRAME_HEADER], payload) == want, u64_at(h, 24).ok_or(BadFrame::Truncated)?),
    };
    if !ok {
        return Err(BadFrame::Checksum);
    }
    Ok(Frame { seq, ts, synced, body })
}

/// One entry of the sparse index: where record `seq` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub seq: u64,
    pub off: u64,
    pub ts: u64,
}

/// A run of valid, dense frames found after a bad spot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    pub first_seq: u64,
    pub last_seq: u64,
    pub start: u64,
    pub end: u64,
    /// Highest `synced_through` in the run.
    pub max_synced: u64,
}

/// The first bad spot of a segment and what follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadSpot {
    /// File offset of the bad bytes.
    pub offset: u64,
    /// The sequence number the record there should have had.
    pub seq: u64,
    /// What is wrong.
    pub reason: String,
    /// Valid frames found after it (with sequence numbers >= `seq`).
    pub after: Vec<Run>,
}

impl BadSpot {
    /// Valid records after the bad spot.
    pub(crate) fn valid_after(&self) -> u64 {
        self.after.iter().map(|r| r.last_seq - r.first_seq + 1).sum()
    }
    /// Highest sequence number of a valid record after the bad spot (0 if none).
    pub(crate) fn max_seq_after(&self) -> u64 {
        self.after.iter().map(|r| r.last_seq).max().unwrap_or(0)
    }
    /// Whether a later frame attests that the damaged record had been fsync'd before it was
    /// written (so this is damage, not a write torn by a crash).
    pub(crate) fn attested(&self) -> bool {
        self.after.iter().any(|r| r.max_synced >= self.seq)
    }
}

/// What a scan of a whole segment file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scan {
    pub version: Version,
    /// Records in the good prefix.
    pub count: u64,
    /// Last sequence number of the good prefix (`first_seq - 1` when empty).
    pub last_seq: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    /// Sparse index of the good prefix.
    pub index: Vec<IndexEntry>,
    /// End of the good prefix (a valid header and whole, dense frames).
    pub good_len: u64,
    /// The first bad spot, if the file does not end at `good_len`.
    pub bad: Option<BadSpot>,
}

/// Scans a segment whose first record should be `first_seq`: the good prefix, its sparse index,
/// and (if the file holds more) the first bad spot and every valid frame after it.
pub(crate) fn scan(buf: &[u8], first_seq: u64, max: usize) -> Scan {
    let version = detect_version(buf, max);
    let mut out = Scan {
        version,
        count: 0,
        last_seq: first_seq.saturating_sub(1),
        first_ts: 0,
        last_ts: 0,
        index: Vec::new(),
        good_len: 0,
        bad: None,
    };
    if buf.is_empty() {
        return out;
    }
    let mut pos = 0usize;
    if version == Version::V2 {
        let header_ok = buf.len() >= SEG_HEADER && &buf[..8] == SEG_MAGIC && u64_at(buf, 8) == Some(first_seq);
        if !header_ok {
            let reason = if buf.len() < SEG_HEADER {
                "the file ends inside the segment header".to_string()
            } else if &buf[..8] != SEG_MAGIC {
                "the segment header is not HMSEG002".to_string()
            } else {
                format!("the segment header names first record {} but the file name says {first_seq}", u64_at(buf, 8).unwrap_or(0))
            };
            let after = resync(buf, 1, first_seq, version, max);
            out.bad = Some(BadSpot { offset: 0, seq: first_seq, reason, after });
            return out;
        }
        pos = SEG_HEADER;
    }
    out.good_len = pos as u64;
    let mut last_indexed: Option<u64> = None;
    while pos < buf.len() {
        let expected = first_seq + out.count;
        let reason = match parse_frame(buf, pos, version, max) {
            Ok(f) if f.seq == expected => {
                if out.count == 0 {
                    out.first_ts = f.ts;
                }
                if last_indexed.is_none_or(|l| pos as u64 >= l + INDEX_STRIDE) {
                    out.index.push(IndexEntry { seq: f.seq, off: pos as u64, ts: f.ts });
                    last_indexed = Some(pos as u64);
                }
                out.last_ts = f.ts;
                out.count += 1;
                out.last_seq = f.seq;
                pos = f.end();
                out.good_len = pos as u64;
                continue;
            }
            Ok(f) => format!("record {} where {expected} was expected", f.seq),
            Err(e) => e.to_string(),
        };
        let after = resync(buf, pos + 1, expected, version, max);
        out.bad = Some(BadSpot { offset: pos as u64, seq: expected, reason, after });
        break;
    }
    out
}

/// A cheap test before the checksum: could a frame of `version` start at `q` with a sequence
/// number of at least `min_seq`?
fn plausible(buf: &[u8], q: usize, min_seq: u64, version: Version, max: usize) -> bool {
    let (Some(len), Some(seq)) = (u32_at(buf, q), u64_at(buf, q + 8)) else { return false };
    if len as usize > max || seq < min_seq || seq - min_seq > 1 << 40 {
        return false;
    }
    match version {
        Version::V1 => true,
        Version::V2 => u64_at(buf, q + 24).is_some_and(|synced| synced < seq),
    }
}

/// Every run of valid, dense frames with sequence numbers >= `min_seq` at or after `from`.
pub(crate) fn resync(buf: &[u8], from: usize, min_seq: u64, version: Version, max: usize) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut q = from;
    let mut floor = min_seq;
    while q + version.frame_header() <= buf.len() {
        if !plausible(buf, q, floor, version, max) {
            q += 1;
            continue;
        }
        let Ok(f) = parse_frame(buf, q, version, max) else {
            q += 1;
            continue;
        };
        let mut run = Run { first_seq: f.seq, last_seq: f.seq, start: q as u64, end: f.end() as u64, max_synced: f.synced };
        let mut p = f.end();
        while let Ok(g) = parse_frame(buf, p, version, max) {
            if g.seq != run.last_seq + 1 {
                break;
            }
            run.last_seq = g.seq;
            run.max_synced = run.max_synced.max(g.synced);
            p = g.end();
            run.end = p as u64;
        }
        floor = run.last_seq + 1;
        q = p;
        runs.push(run);
    }
    runs
}

/// The sidecar index of a sealed (or cleanly closed) segment: its extent and sparse index, so
/// opening the log does not read the segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentIndex {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Bytes of the segment this describes (all fsync'd when it was written).
    pub len: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    pub entries: Vec<IndexEntry>,
}

impl SegmentIndex {
    /// The index of a segment with these extents.
    pub(crate) fn of(first_seq: u64, last_seq: u64, len: u64, ts: (u64, u64), entries: &[IndexEntry]) -> SegmentIndex {
        SegmentIndex { first_seq, last_seq, len, first_ts: ts.0, last_ts: ts.1, entries: entries.to_vec() }
    }
}

/// Encodes a sidecar index.
pub(crate) fn encode_index(i: &SegmentIndex) -> Vec<u8> {
    let mut b = Vec::with_capacity(60 + i.entries.len() * 24);
    b.extend_from_slice(IDX_MAGIC);
    for v in [i.first_seq, i.last_seq, i.len, i.first_ts, i.last_ts] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&(i.entries.len() as u32).to_le_bytes());
    for e in &i.entries {
        for v in [e.seq, e.off, e.ts] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a sidecar index; `None` if it is not a whole, valid one.
pub(crate) fn decode_index(b: &[u8]) -> Option<SegmentIndex> {
    if b.len() < 56 + 4 || &b[..8] != IDX_MAGIC {
        return None;
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body) != u32_at(crc, 0)? {
        return None;
    }
    let n = u32_at(body, 48)? as usize;
    if body.len() != 52 + n.checked_mul(24)? {
        return None;
    }
    let entries = (0..n)
        .map(|k| {
            let at = 52 + k * 24;
            Some(IndexEntry { seq: u64_at(body, at)?, off: u64_at(body, at + 8)?, ts: u64_at(body, at + 16)? })
        })
        .collect::<Option<Vec<_>>>()?;
    let i = SegmentIndex {
        first_seq: u64_at(body, 8)?,
        last_seq: u64_at(body, 16)?,
        len: u64_at(body, 24)?,
        first_ts: u64_at(body, 32)?,
        last_ts: u64_at(body, 40)?,
        entries,
    };
    // Entries must lie inside the segment and ascend.
    let sane = i.last_seq + 1 >= i.first_seq
        && i.entries.windows(2).all(|w| w[0].seq < w[1].seq && w[0].off < w[1].off)
        && i.entries.iter().all(|e| e.seq >= i.first_seq && e.seq <= i.last_seq && e.off < i.len);
    sane.then_some(i)
}

/// One slot of the ack file: a counter (the newer slot wins) and the watermark.
pub(crate) fn encode_ack_slot(counter: u64, watermark: u64) -> [u8; ACK_SLOT] {
    let mut b = [0u8; ACK_SLOT];
    b[..8].copy_from_slice(ACK_MAGIC);
    b[8..16].copy_from_slice(&counter.to_le_bytes());
    b[16..24].copy_from_slice(&watermark.to_le_bytes());
    let crc = crc32c::crc32c(&b[..24]);
    b[24..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_ack_slot(b: &[u8]) -> Option<(u64, u64)> {
    let s = b.get(..ACK_SLOT)?;
    if &s[..8] != ACK_MAGIC || crc32c::crc32c(&s[..24]) != u32_at(s, 24)? {
        return None;
    }
    Some((u64_at(s, 8)?, u64_at(s, 16)?))
}

/// Decodes an ack file: `Ok((counter, watermark))` of the newest valid slot, or the version-1
/// form (12 bytes: watermark + CRC32C), counter 0. `Err` says why neither is there.
pub(crate) fn decode_ack(b: &[u8]) -> Result<(u64, u64), String> {
    if b.len() == 12 {
        let v = u64_at(b, 0).expect("12 bytes");
        return if crc32c::crc32c(&b[..8]) == u32_at(b, 8).expect("12 bytes") {
            Ok((0, v))
        } else {
            Err("the ack watermark (version 1) fails its checksum".into())
        };
    }
    ACK_SLOT_OFFSETS
        .iter()
        .filter_map(|&o| decode_ack_slot(b.get(o as usize..)?))
        .max_by_key(|(c, _)| *c)
        .ok_or_else(|| "neither slot of the ack watermark file is valid".into())
}

/// Encodes a snapshot (version 2: the checksum covers `covered` and the length too).
pub(crate) fn encode_snapshot(covered: u64, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + body.len());
    b.extend_from_slice(SNAP_MAGIC_V2);
    b.extend_from_slice(&covered.to_le_bytes());
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[8..24]), body);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(body);
    b
}

/// Decodes a snapshot file (version 1 or 2): `(covered_seq, body)`.
pub(crate) fn decode_snapshot(b: &[u8]) -> Result<(u64, &[u8]), String> {
    if b.len() < 28 {
        return Err(format!("{} bytes is too short for a snapshot", b.len()));
    }
    let v2 = match &b[..8] {
        m if m == SNAP_MAGIC_V2 => true,
        m if m == SNAP_MAGIC_V1 => false,
        _ => return Err("not a snapshot (bad magic)".into()),
    };
    let covered = u64_at(b, 8).expect("28 bytes");
    let len = u64_at(b, 16).expect("28 bytes");
    let crc = u32_at(b, 24).expect("28 bytes");
    if len != (b.len() - 28) as u64 {
        return Err(format!("the snapshot says {len} bytes but holds {}", b.len() - 28));
    }
    let body = &b[28..];
    let want = if v2 { crc32c::crc32c_append(crc32c::crc32c(&b[8..24]), body) } else { crc32c::crc32c(body) };
    if want != crc {
        return Err("the snapshot fails its checksum".into());
    }
    Ok((covered, body))
}

/// Encodes the list of sequence ranges an operator accepted as lost (`store repair`).
pub(crate) fn encode_holes(holes: &[(u64, u64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + holes.len() * 16);
    b.extend_from_slice(HOLES_MAGIC);
    b.extend_from_slice(&(holes.len() as u32).to_le_bytes());
    for (a, z) in holes {
        b.extend_from_slice(&a.to_le_bytes());
        b.extend_from_slice(&z.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes the accepted-holes file.
pub(crate) fn decode_holes(b: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    let bad = || "the holes file is corrupt".to_string();
    if b.len() < 16 || &b[..8] != HOLES_MAGIC {
        return Err(bad());
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body) != u32_at(crc, 0).ok_or_else(bad)? {
        return Err(bad());
    }
    let n = u32_at(body, 8).ok_or_else(bad)? as usize;
    if body.len() != 12 + n * 16 {
        return Err(bad());
    }
    Ok((0..n).map(|k| (u64_at(body, 12 + k * 16).unwrap_or(0), u64_at(body, 20 + k * 16).unwrap_or(0))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(first: u64, n: u64, synced_lag: u64) -> Vec<u8> {
        let mut b = segment_header(first).to_vec();
        for s in first..first + n {
            encode_frame(&mut b, s, 1000 + s, s.saturating_sub(synced_lag + 1), format!("payload {s}").as_bytes());
        }
        b
    }

    #[test]
    fn frames_round_trip_and_every_flip_is_caught() {
        let mut b = Vec::new();
        encode_frame(&mut b, 7, 99, 6, b"hello");
        let f = parse_frame(&b, 0, Version::V2, 1024).unwrap();
        assert_eq!((f.seq, f.ts, f.synced, &b[f.body.clone()]), (7, 99, 6, &b"hello"[..]));
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(parse_frame(&c, 0, Version::V2, 1024).is_err(), "flip at {i} undetected");
        }
        assert_eq!(parse_frame(&b[..b.len() - 1], 0, Version::V2, 1024), Err(BadFrame::Truncated));
    }

    #[test]
    fn scan_builds_a_sparse_index_and_finds_what_follows_a_bad_spot() {
        let b = segment(10, 5000, 3);
        let s = scan(&b, 10, 1024);
        assert_eq!((s.count, s.last_seq, s.good_len, s.bad.clone()), (5000, 5009, b.len() as u64, None));
        assert!(s.index.len() > 1 && s.index.len() < 20, "{} index entries", s.index.len());
        assert_eq!(s.index[0], IndexEntry { seq: 10, off: SEG_HEADER as u64, ts: 1010 });
        // Damage in the middle: later frames attest it was fsync'd.
        let mut d = b.clone();
        let at = d.windows(12).position(|w| w == b"payload 2000").unwrap();
        d[at] ^= 1;
        let s = scan(&d, 10, 1024);
        let bad = s.bad.unwrap();
        assert_eq!((s.last_seq, bad.seq, bad.valid_after(), bad.max_seq_after()), (1999, 2000, 3009, 5009));
        assert!(bad.attested());
        // A torn tail: nothing valid after it.
        let s = scan(&b[..b.len() - 3], 10, 1024);
        let bad = s.bad.unwrap();
        assert_eq!((bad.seq, bad.valid_after()), (5009, 0));
        assert!(!bad.attested());
    }

    #[test]
    fn a_torn_write_in_the_unsynced_tail_is_not_attested() {
        // The last 40 records were appended while nothing after 59 was synced.
        let mut b = segment_header(1).to_vec();
        for s in 1..=100u64 {
            encode_frame(&mut b, s, s, if s > 60 { 59 } else { s - 1 }, &[b'x'; 50]);
        }
        let tear = b.len() - 30 * frame_len(50) - 10;
        for x in &mut b[tear..tear + 20] {
            *x = 0;
        }
        let bad = scan(&b, 1, 1024).bad.unwrap();
        assert!(bad.valid_after() > 0 && !bad.attested(), "{bad:?}");
    }

    #[test]
    fn version_one_segments_still_read() {
        let mut b = Vec::new();
        for s in 1..=3u64 {
            let p = format!("old {s}");
            b.extend_from_slice(&(p.len() as u32).to_le_bytes());
            b.extend_from_slice(&crc_v1(s, 5, p.as_bytes()).to_le_bytes());
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&5u64.to_le_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        let s = scan(&b, 1, 1024);
        assert_eq!((s.version, s.count, s.bad), (Version::V1, 3, None));
    }

    #[test]
    fn index_ack_snapshot_and_holes_round_trip_and_reject_damage() {
        let i = SegmentIndex {
            first_seq: 5,
            last_seq: 9,
            len: 500,
            first_ts: 1,
            last_ts: 2,
            entries: vec![IndexEntry { seq: 5, off: 16, ts: 1 }, IndexEntry { seq: 8, off: 300, ts: 2 }],
        };
        let b = encode_index(&i);
        assert_eq!(decode_index(&b), Some(i));
        for k in 0..b.len() {
            let mut c = b.clone();
            c[k] ^= 4;
            assert_eq!(decode_index(&c), None);
        }
        let mut ack = vec![0u8; 1024];
        ack[..28].copy_from_slice(&encode_ack_slot(1, 10));
        ack[512..540].copy_from_slice(&encode_ack_slot(2, 20));
        assert_eq!(decode_ack(&ack), Ok((2, 20)));
        ack[520] ^= 1; // a torn newer slot: the older one is still there
        assert_eq!(decode_ack(&ack), Ok((1, 10)));
        let snap = encode_snapshot(42, b"state");
        assert_eq!(decode_snapshot(&snap), Ok((42, &b"state"[..])));
        let mut s = snap.clone();
        s[8] ^= 1;
        assert!(decode_snapshot(&s).is_err(), "the checksum covers covered_seq");
        let holes = encode_holes(&[(3, 4), (9, 12)]);
        assert_eq!(decode_holes(&holes), Ok(vec![(3, 4), (9, 12)]));
    }
}
