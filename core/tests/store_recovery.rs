//! Recovery rules of the storage engine, tried the way damage happens: a flipped byte in a log
//! segment, in a sealed segment, in the first record of a state log, in a snapshot header; a
//! state machine refusing an event; two openers of one directory. Each of these destroyed or
//! silently dropped data before the rules in docs/storage.md were implemented.

use std::path::{Path, PathBuf};

use hubmsg_core::store::{Durability, Log, LogOptions, Machine, StateLog, StateOptions};
use hubmsg_core::{Error, ErrorKind, Result};

fn opts(segment_bytes: u64) -> LogOptions {
    LogOptions { segment_bytes, durability: Durability::Always, ..LogOptions::default() }
}

/// Appends `n` records, one fsync'd group commit each, so every record is acknowledged on its own.
fn fill(log: &Log, n: u64) {
    for i in 1..=n {
        let s = log.append(format!("record {i:04}").as_bytes()).unwrap();
        log.wait_durable_blocking(s).unwrap();
    }
}

fn read_all(log: &Log) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let b = log.read(from, 1000, 1 << 20).unwrap();
        let Some(l) = b.last() else { break };
        from = l.seq + 1;
        out.extend(b.into_iter().map(|r| (r.seq, String::from_utf8(r.payload.to_vec()).unwrap())));
    }
    out
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "seg")).collect();
    v.sort();
    v
}

/// Flips one byte inside the payload of the record whose text is `needle`.
fn flip_record(file: &Path, needle: &str) {
    let mut b = std::fs::read(file).unwrap();
    let at = b.windows(needle.len()).position(|w| w == needle.as_bytes()).expect("record present in the file");
    b[at + needle.len() - 1] ^= 0x20;
    std::fs::write(file, b).unwrap();
}

#[test]
fn a_bad_record_followed_by_valid_records_is_never_cut() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), opts(1 << 20)).unwrap();
        fill(&log, 100);
        log.close().unwrap();
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    flip_record(&seg, "record 0050");
    let size = std::fs::metadata(&seg).unwrap().len();

    let log = Log::open(dir.path(), opts(1 << 20)).unwrap();
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), size, "recovery must not cut valid, fsync'd records");
    // Readable up to the damage (reading into it is an error, not a silent end of the log);
    // appends refused with an error naming the file and offset, never a sequence number that
    // was already handed out.
    let got = log.read(1, 1000, 1 << 20).unwrap();
    assert_eq!(got.len(), 49, "records before the damage are readable");
    let e = log.read(50, 1000, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("store repair"), "{e}");
    let e = log.append(b"next").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Storage, "{e}");
    let text = e.to_string();
    assert!(text.contains(&seg.file_name().unwrap().to_string_lossy().to_string()) && text.contains("offset"), "{text}");
}

#[test]
fn a_damaged_sealed_segment_is_never_truncated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), opts(600)).unwrap();
        fill(&log, 200);
        log.close().unwrap();
    }
    let segs = segment_files(dir.path());
    assert!(segs.len() > 4, "{} segments", segs.len());
    let victim = segs[1].clone();
    let text = String::from_utf8_lossy(&std::fs::read(&victim).unwrap()).to_string();
    let needle = text.match_indices("record ").nth(1).map(|(i, _)| text[i..i + 11].to_string()).unwrap();
    flip_record(&victim, &needle);
    let before = std::fs::read(&victim).unwrap();

    let log = Log::open(dir.path(), opts(600));
    assert_eq!(std::fs::read(&victim).unwrap(), before, "a sealed segment must never be modified by recovery");
    let log = log.expect("the log still opens");
    // Everything before the damage reads; the damaged record is reported, not skipped silently.
    let mut from = 1;
    let err = loop {
        match log.read(from, 1000, 1 << 20) {
            Ok(b) if b.is_empty() => break None,
            Ok(b) => from = b.last().unwrap().seq + 1,
            Err(e) => break Some(e),
        }
    };
    let err = err.expect("reading the damaged record is an error");
    assert_eq!(err.kind(), ErrorKind::Storage);
    assert!(err.to_string().contains(&victim.file_name().unwrap().to_string_lossy().to_string()), "{err}");
}

#[derive(Default)]
struct Names(Vec<String>);

impl Machine for Names {
    fn apply(&mut self, event: &[u8]) -> Result<()> {
        let s = std::str::from_utf8(event).map_err(|_| Error::new(ErrorKind::Storage, "not utf-8"))?;
        if s.starts_with('!') {
            return Err(Error::invalid(format!("refused event {s}")));
        }
        self.0.push(s.to_string());
        Ok(())
    }
    fn snapshot(&self) -> Vec<u8> {
        self.0.join("\n").into_bytes()
    }
    fn restore(snapshot: Option<&[u8]>) -> Result<Self> {
        Ok(Names(match snapshot {
            None => Vec::new(),
            Some([]) => Vec::new(),
            Some(b) => String::from_utf8(b.to_vec()).unwrap().lines().map(String::from).collect(),
        }))
    }
}

fn state_opts() -> StateOptions {
    StateOptions { durability: Durability::Always, compact_after_bytes: u64::MAX }
}

#[test]
fn a_damaged_first_state_event_fails_the_open_instead_of_starting_empty() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = StateLog::<Names>::open(dir.path(), state_opts()).unwrap();
        for i in 0..21 {
            let seq = s.commit(format!("device-{i:02}").as_bytes()).unwrap();
            s.wait_durable_blocking(seq).unwrap();
        }
        s.close().unwrap();
    }
    let seg = segment_files(&dir.path().join("events")).pop().unwrap();
    flip_record(&seg, "device-00");
    let before = std::fs::read(&seg).unwrap();
    let e = StateLog::<Names>::open(dir.path(), state_opts()).err().expect("a state log with a damaged event must not open as if empty");
    assert_eq!(e.kind(), ErrorKind::Storage, "{e}");
    assert!(e.to_string().contains("store repair"), "the error says what to do: {e}");
    assert_eq!(std::fs::read(&seg).unwrap(), before, "nothing is cut");
}

#[test]
fn a_damaged_registry_refuses_to_start_instead_of_regenerating_keys() {
    let dir = tempfile::tempdir().unwrap();
    let owner_key = {
        let reg = hubmsg_core::hub::Registry::open(dir.path(), Durability::Always).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for i in 0..21 {
            rt.block_on(reg.create(hubmsg_core::proto::CreateDevice { device_id: format!("dev-{i}"), ..Default::default() })).unwrap();
        }
        let k = reg.policy("iothubowner").unwrap().primary_key;
        reg.close().unwrap();
        k
    };
    // Flip a byte in the first record (the first policy).
    let seg = segment_files(&dir.path().join("events")).remove(0);
    let mut b = std::fs::read(&seg).unwrap();
    b[40] ^= 0x01;
    std::fs::write(&seg, &b).unwrap();
    match hubmsg_core::hub::Registry::open(dir.path(), Durability::Always) {
        Ok(reg) => panic!(
            "the registry opened with {} devices and iothubowner key {} (was {owner_key})",
            reg.devices().len(),
            reg.policy("iothubowner").map(|p| p.primary_key).unwrap_or_default()
        ),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Storage, "{e}"),
    }
    assert_eq!(std::fs::read(&seg).unwrap(), b, "the damaged registry is left as it was");
}

#[test]
fn the_snapshot_checksum_covers_its_covered_sequence_number() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = StateLog::<Names>::open(dir.path(), state_opts()).unwrap();
        for i in 0..10 {
            let seq = s.commit(format!("n{i}").as_bytes()).unwrap();
            s.wait_durable_blocking(seq).unwrap();
        }
        s.compact().unwrap();
        s.close().unwrap();
    }
    let p = dir.path().join("snapshot");
    let mut b = std::fs::read(&p).unwrap();
    b[8] ^= 0x04; // covered_seq, low byte
    std::fs::write(&p, b).unwrap();
    let e = StateLog::<Names>::open(dir.path(), state_opts()).err().expect("a snapshot whose covered_seq changed is corrupt");
    assert_eq!(e.kind(), ErrorKind::Storage);
}

#[test]
fn an_event_the_machine_refuses_is_never_appended() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = StateLog::<Names>::open(dir.path(), state_opts()).unwrap();
        s.commit(b"first").unwrap();
        assert!(s.commit(b"!bad").is_err(), "the machine refuses the event");
        let seq = s.commit(b"second").unwrap();
        s.wait_durable_blocking(seq).unwrap();
        s.close().unwrap();
    }
    let s = StateLog::<Names>::open(dir.path(), state_opts()).expect("replay is not bricked by a refused event");
    assert_eq!(s.read(|m| m.0.clone()), vec!["first".to_string(), "second".to_string()]);
}

#[test]
fn concurrent_compactions_never_leave_the_snapshot_behind_the_log() {
    for round in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let opts = StateOptions { durability: Durability::Never, compact_after_bytes: 2048 };
        {
            let s = StateLog::<Names>::open(dir.path(), opts.clone()).unwrap();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let t = {
                let (s, stop) = (s.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        s.compact().unwrap();
                    }
                })
            };
            for i in 0..20_000 {
                s.commit(format!("event {i:06} of round {round}").as_bytes()).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            t.join().unwrap();
            s.close().unwrap();
        }
        let s = StateLog::<Names>::open(dir.path(), opts).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(s.read(|m| m.0.len()), 20_000, "round {round}");
    }
}

#[test]
fn a_second_opener_of_a_log_directory_is_refused_with_the_holder_named() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts(1 << 20)).unwrap();
    fill(&log, 3);
    let e = Log::open(dir.path(), opts(1 << 20)).err().expect("a second writer must be refused");
    assert_eq!(e.kind(), ErrorKind::Storage);
    assert!(e.to_string().contains(&std::process::id().to_string()), "the error names the holder's pid: {e}");
    log.close().unwrap();
    drop(log);
    let log = Log::open(dir.path(), opts(1 << 20)).expect("the directory is free again once the first log closed");
    assert_eq!(log.last_seq(), 3);
}

#[test]
fn check_reports_damage_and_repair_quarantines_it_keeping_every_valid_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), opts(2000)).unwrap();
        fill(&log, 300);
        log.close().unwrap();
    }
    let segs = segment_files(dir.path());
    // One damaged record in a sealed segment and one in the last segment.
    flip_record(&segs[1], &{
        let t = String::from_utf8_lossy(&std::fs::read(&segs[1]).unwrap()).to_string();
        t.match_indices("record ").nth(2).map(|(i, _)| t[i..i + 11].to_string()).unwrap()
    });
    flip_record(segs.last().unwrap(), "record 0299");
    let before: Vec<Vec<u8>> = segs.iter().map(|p| std::fs::read(p).unwrap()).collect();

    let report = hubmsg_core::store::check::check(dir.path()).unwrap();
    assert!(!report.is_clean(), "{report}");
    assert_eq!(report.stores.len(), 1);
    assert_eq!(report.stores[0].damage.len(), 2, "{report}");
    let after: Vec<Vec<u8>> = segs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(before, after, "check changes nothing");

    let repaired = hubmsg_core::store::check::repair(dir.path()).unwrap();
    assert!(repaired.is_clean(), "{repaired}");
    let quarantined = std::fs::read_dir(dir.path().join("quarantine")).unwrap().count();
    assert_eq!(quarantined, 2, "the damaged segments are kept aside");

    let log = Log::open(dir.path(), opts(2000)).unwrap();
    assert!(log.damage().is_empty(), "{:?}", log.damage());
    let got = read_all(&log);
    assert_eq!(got.len(), 298, "every valid record is kept");
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "sequence numbers stay unique and ordered");
    assert_eq!(got.last().unwrap(), &(300, "record 0300".to_string()));
    assert_eq!(log.append(b"after repair").unwrap(), 301, "no sequence number is reused");
}
