//! Full disks on a real file system: a small tmpfs mounted for the test (root only; otherwise the
//! test prints `SKIP full-disk: <reason>` and does nothing).
//!
//! - A hub whose data directory fills up refuses new D2C with a clear error (devices keep their
//!   messages in their outboxes and retry), keeps serving reads and C2D (send, complete,
//!   feedback), and resumes by itself when space is freed: 0 lost end to end.
//! - A device outbox on a full disk: `send` fails with a `Storage` error, nothing accepted is
//!   lost, and sending resumes without a restart once space is freed.

mod common;

use std::collections::HashSet;
use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::{AckMode, FeedbackStatus, StartPosition};
use hubmsg_core::{DeviceClient, DeviceOptions, ErrorKind, Message};

const T: Duration = Duration::from_secs(30);

/// A tmpfs mounted at a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let parent = tempfile::tempdir().map_err(|e| e.to_string())?;
        let dir = parent.path().join("disk");
        std::fs::create_dir(&dir).map_err(|e| e.to_string())?;
        let target = CString::new(dir.to_str().unwrap()).unwrap();
        let opts = CString::new(format!("size={size}")).unwrap();
        // SAFETY: valid NUL-terminated strings; mount(2) does not keep the pointers.
        let rc = unsafe { libc::mount(c"tmpfs".as_ptr(), target.as_ptr(), c"tmpfs".as_ptr(), 0, opts.as_ptr().cast()) };
        if rc != 0 {
            return Err(format!("cannot mount a tmpfs ({}; needs root with CAP_SYS_ADMIN)", std::io::Error::last_os_error()));
        }
        Ok(Tmpfs { dir, _parent: parent })
    }

    fn free(&self) -> u64 {
        let c = CString::new(self.dir.to_str().unwrap()).unwrap();
        // SAFETY: valid path and a zeroed statvfs to fill.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s.f_bavail as u64 * s.f_frsize as u64
    }

    /// Fills the disk until `leave` bytes are free (a file the test removes to free space).
    fn fill(&self, leave: u64) -> PathBuf {
        let p = self.dir.join("filler");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p).unwrap();
        let chunk = vec![0xA5u8; 64 * 1024];
        while self.free() > leave {
            let n = ((self.free() - leave) as usize).min(chunk.len());
            if f.write_all(&chunk[..n]).is_err() {
                break;
            }
        }
        f.sync_all().unwrap();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let c = CString::new(self.dir.to_str().unwrap()).unwrap();
        // SAFETY: valid path; MNT_DETACH so a store still closing cannot keep it busy.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn skip(why: &str) {
    // Straight to stdout, past the test harness's capture, so tests/all.sh shows it.
    let _ = std::io::stdout().write_all(format!("SKIP full-disk: {why}\n").as_bytes());
}

async fn device_with_outbox(hub: &Hub, id: &str, dir: &Path) -> DeviceClient {
    if hub.registry().device(id).await.unwrap().is_none() {
        hub.create_device(id).await.unwrap();
    }
    let mut o = DeviceOptions::from_connection_string(&hub.device_connection_string(id).await.unwrap()).unwrap();
    o.retry = fast_retry();
    o.outbox = OutboxOptions { dir: Some(dir.to_path_buf()), ..OutboxOptions::default() };
    DeviceClient::connect(o).await.unwrap()
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    assert!(eventually(limit, &mut cond).await, "timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hub_disk_refuses_d2c_keeps_serving_and_resumes_with_nothing_lost() {
    let disk = match Tmpfs::mount("16m") {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    let mut cfg = HubConfig::new(disk.dir.join("hub"));
    cfg.partitions = 1;
    cfg.segment_bytes = 256 * 1024;
    cfg.disk_reserve_bytes = 2 * 1024 * 1024;
    cfg.feedback_interval = Duration::from_millis(50);
    let hub = Hub::start(cfg).await.unwrap();
    let svc = service(&hub).await;
    let mut events = svc.events("$Default", StartPosition::Earliest).await.unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let dev = device_with_outbox(&hub, "meter", &elsewhere.path().join("meter")).await;
    let lamp = device_with_outbox(&hub, "lamp", &elsewhere.path().join("lamp")).await;
    let mut lamp_rx = lamp.c2d().unwrap();
    // Leave the hub 3 MiB: 1 MiB above its reserve.
    let filler = disk.fill(3 * 1024 * 1024);

    const N: usize = 3000;
    let body = "x".repeat(1000);
    for i in 0..N {
        dev.send(Message::new(format!("{i} {body}")).with_message_id(format!("m{i}"))).await.unwrap();
    }
    let refused = || hub.stats().d2c_refused.load(Ordering::Relaxed);
    wait_for("the hub refuses D2C on its full disk", T, || refused() > 0).await;
    assert!(dev.stats().outbox.depth > 0, "the device keeps the refused messages in its outbox");

    // Reads go on: what was stored is delivered.
    let mut got = HashSet::new();
    while let Some(e) = events.next_timeout(Duration::from_millis(500)).await.unwrap() {
        got.insert(e.message().message_id.clone().unwrap());
        e.ack();
    }
    assert!(!got.is_empty() && got.len() < N, "{} of {N} stored before the disk filled", got.len());
    // C2D goes on in the reserve: send, deliver, complete, feedback.
    let fb = svc.await_outcome("turn-on").unwrap();
    svc.send_c2d("lamp", Message::new("on").with_message_id("turn-on"), AckMode::Full).await.unwrap();
    let m = lamp_rx.recv_timeout(T).await.unwrap().expect("the C2D message is delivered");
    m.complete().unwrap();
    assert_eq!(tokio::time::timeout(T, fb).await.unwrap().unwrap().status_code, FeedbackStatus::Success);
    events.checkpoint().await.expect("checkpoints are written on a full disk");

    // Space comes back: everything else arrives, nothing lost, no restart.
    std::fs::remove_file(&filler).unwrap();
    while got.len() < N {
        let Some(e) = events.next_timeout(T).await.unwrap() else { break };
        got.insert(e.message().message_id.clone().unwrap());
        e.ack();
    }
    assert_eq!(got.len(), N, "every message sent reaches the consumer once the disk has room");
    dev.flush(T).await.unwrap();
    assert_eq!(dev.stats().outbox.delivered, N as u64);
    events.close().await;
    dev.close().await.unwrap();
    lamp.close().await.unwrap();
    svc.close().await;
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_disk_fails_send_with_storage_and_resumes_without_a_restart() {
    let disk = match Tmpfs::mount("4m") {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    let h = start_hub().await;
    let svc = service(&h.hub).await;
    let mut events = svc.events("$Default", StartPosition::Earliest).await.unwrap();
    let dev = device_with_outbox(&h.hub, "logger", &disk.dir.join("outbox")).await;
    // Delivered messages do not free space (the active segment is never deleted), so sending
    // fills the disk.
    let filler = disk.fill(256 * 1024);
    let body = "y".repeat(2000);
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..2000 {
        match dev.send(Message::new(format!("{i} {body}")).with_message_id(format!("k{i}"))).await {
            Ok(_) => accepted.push(format!("k{i}")),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("sending on a full disk fails");
    assert_eq!(e.kind(), ErrorKind::Storage, "{e}");
    assert!(e.to_string().contains("disk is full") || e.to_string().contains("No space"), "the error says why: {e}");
    // While full, further sends fail too (nothing is silently dropped).
    assert_eq!(dev.send(Message::new("while full")).await.unwrap_err().kind(), ErrorKind::Storage);

    std::fs::remove_file(&filler).unwrap();
    // Sending resumes by itself (the store retries its write), without reopening anything.
    let mut resumed = false;
    for _ in 0..200 {
        if dev.send(Message::new("after").with_message_id("after")).await.is_ok() {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed, "send works again once the disk has room");
    accepted.push("after".into());
    dev.flush(T).await.unwrap();
    // (A send that failed may still have been stored: more ids than accepted can arrive.)
    let mut got = HashSet::new();
    while !accepted.iter().all(|id| got.contains(id)) {
        let Some(e) = events.next_timeout(T).await.unwrap() else { break };
        got.insert(e.message().message_id.clone().unwrap());
        e.ack();
    }
    for id in &accepted {
        assert!(got.contains(id), "accepted message {id} was lost");
    }
    events.close().await;
    dev.close().await.unwrap();
    svc.close().await;
    h.hub.shutdown().await.unwrap();
}
