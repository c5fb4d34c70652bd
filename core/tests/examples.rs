//! The Rust examples (examples/rust, cargo examples of this crate) run as a reader runs them: no
//! arguments besides a count, in demo mode (an embedded hub in a temporary directory). `cargo
//! test` builds the examples before the tests; they sit in target/<profile>/examples/.

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/examples-<hash> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("own path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>").join("examples");
    dir.join(name)
}

fn run(name: &str, count: &str, expect: &[&str]) {
    let path = example(name);
    assert!(path.exists(), "{} is missing: a plain `cargo test -p hubmsg-core` builds the examples first (with `--test examples` alone, run `cargo build -p hubmsg-core --examples` before)", path.display());
    let out = Command::new(&path)
        .arg(count)
        .env_remove("HUBMSG_DEVICE_CONNECTION_STRING")
        .env_remove("HUBMSG_SERVICE_CONNECTION_STRING")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name} exited {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("demo mode"), "{name}: {stdout}");
    for e in expect {
        assert!(stdout.contains(e), "{name}: no '{e}' in\n{stdout}");
    }
}

#[test]
fn send_telemetry_in_demo_mode() {
    run("send_telemetry", "200", &["delivered 200 of 200"]);
}

#[test]
fn receive_commands_in_demo_mode_prints_the_feedback() {
    run("receive_commands", "8", &["received 8 commands", "feedback: cmd-0 -> Success", "feedback: cmd-3 -> Rejected"]);
}

#[test]
fn service_monitor_in_demo_mode() {
    run("service_monitor", "30", &["received 30 events"]);
}

#[test]
fn offline_buffering_in_demo_mode_loses_nothing() {
    run("offline_buffering", "300", &["received 300 distinct, lost 0"]);
}
