//! `hubmsg store check` and `hubmsg store repair` on real directories: what they report, that
//! check changes nothing, that repair keeps every valid record and refuses a store in use.

use std::path::Path;
use std::process::{Command, Output};

use hubmsg_core::store::{Durability, Log, LogOptions};

const BIN: &str = env!("CARGO_BIN_EXE_hubmsg");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run hubmsg")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn make_log(dir: &Path, n: u64) {
    let log = Log::open(dir, LogOptions { segment_bytes: 4096, durability: Durability::Never, ..LogOptions::default() }).unwrap();
    for i in 1..=n {
        log.append(format!("event {i:05}").as_bytes()).unwrap();
    }
    log.close().unwrap();
}

fn flip(file: &Path, needle: &str) {
    let mut b = std::fs::read(file).unwrap();
    let at = b.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap();
    b[at + needle.len() - 1] ^= 0x10;
    std::fs::write(file, b).unwrap();
}

#[test]
fn check_reports_damage_without_changing_anything_and_repair_keeps_every_valid_record() {
    let dir = tempfile::tempdir().unwrap();
    let p0 = dir.path().join("events").join("p0");
    make_log(&p0, 1000);
    make_log(&dir.path().join("events").join("p1"), 10);
    let seg = std::fs::read_dir(&p0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg") && std::fs::read(p).unwrap().windows(11).any(|w| w == b"event 00500"))
        .unwrap();
    flip(&seg, "event 00500");
    let before = std::fs::read(&seg).unwrap();

    let o = run(&["store", "check", dir.path().to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("DAMAGED") && t.contains(&seg.file_name().unwrap().to_string_lossy().to_string()) && t.contains("offset"), "{t}");
    assert!(t.contains("record 500 is damaged") && t.contains("2 stores checked, 1 damaged"), "{t}");
    assert_eq!(std::fs::read(&seg).unwrap(), before, "check changes nothing");

    // Repair refuses a store that is open.
    let held = Log::open(&p0, LogOptions::default()).unwrap();
    let o = run(&["store", "repair", dir.path().to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o).contains(&format!("process {}", std::process::id())), "{}", text(&o));
    drop(held);

    let o = run(&["store", "repair", dir.path().to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("repair: copied") && t.contains("records 500..500 are lost"), "{t}");
    let o = run(&["store", "check", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("2 stores checked, 0 damaged"), "{}", text(&o));

    let log = Log::open(&p0, LogOptions::default()).unwrap();
    let mut n = 0;
    let mut from = 1;
    loop {
        let b = log.read(from, 500, 1 << 20).unwrap();
        let Some(l) = b.last() else { break };
        assert!(b.iter().all(|r| r.seq != 500));
        n += b.len();
        from = l.seq + 1;
    }
    assert_eq!(n, 999, "every valid record is kept");
    assert!(dir.path().join("events/p0/quarantine").join(seg.file_name().unwrap()).exists(), "the damaged segment is kept aside");
}
