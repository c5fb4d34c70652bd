//! `hubmsg hub` keeps its owner key out of its output: the connection string goes to a 0600
//! file in the data directory and is printed only on the first start; `--no-mqtt` runs TLS only;
//! `hubmsg demo` runs end to end.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hubmsg");

/// Starts a hub with `args`, collects its stdout until it names its connection-string file, kills
/// it, and returns the lines.
fn start_lines(args: &[&str]) -> Vec<String> {
    let mut child = Command::new(BIN).arg("hub").args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.starts_with("HUBMSG_HUB_CONNECTION_STRING_FILE=");
        lines.push(line);
        if done || Instant::now() > deadline {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn the_owner_key_goes_to_a_0600_file_and_is_printed_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hub");
    let mqtt = format!("127.0.0.1:{}", free_port());
    let args = ["--data", data.to_str().unwrap(), "--mqtt", &mqtt];
    let first = start_lines(&args);
    let file = data.join("owner.connection-string");
    let cs = std::fs::read_to_string(&file).unwrap().trim().to_string();
    let key = cs.split("SharedAccessKey=").nth(1).expect("a key in the file").to_string();
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(first.iter().any(|l| l == &format!("HUBMSG_HUB_CONNECTION_STRING={cs}")), "first start shows it once: {first:?}");
    let mqtt = format!("127.0.0.1:{}", free_port());
    let again = start_lines(&["--data", data.to_str().unwrap(), "--mqtt", &mqtt]);
    assert!(again.iter().all(|l| !l.contains(&key)), "later starts never print the key: {again:?}");
    assert_eq!(again.last().unwrap(), &format!("HUBMSG_HUB_CONNECTION_STRING_FILE={}", file.display()));
    // The file follows the new port.
    assert!(std::fs::read_to_string(&file).unwrap().contains(&mqtt));
}

#[test]
fn no_mqtt_runs_tls_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hub");
    let mqtts = format!("127.0.0.1:{}", free_port());
    let lines = start_lines(&["--data", data.to_str().unwrap(), "--no-mqtt", "--mqtts", &mqtts]);
    assert!(lines.iter().any(|l| l.starts_with("mqtts listening on")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.starts_with("mqtt listening on")), "{lines:?}");
    // --no-mqtt without --mqtts is refused.
    let out = Command::new(BIN).args(["hub", "--data", data.to_str().unwrap(), "--no-mqtt"]).output().unwrap();
    assert!(!out.status.success());
}

/// `hubmsg demo` on the embedded hub: devices behind the chaos link must be accepted (their
/// tokens name the link, one of the hub's public addresses) and nothing may be lost. Without
/// `--public-address` the hub's host rule refused every device (CONNACK 5).
#[test]
fn the_embedded_demo_runs_through_its_chaos_link_and_loses_nothing() {
    let mut child = Command::new(BIN)
        .args(["demo", "--devices", "5", "--duration", "4s", "--rate", "20", "--seed", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("nothing lost."), "{stdout}");
    assert!(stdout.contains("hub SIGKILL + restart"), "{stdout}");
}
