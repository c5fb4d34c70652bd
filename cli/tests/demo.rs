//! `hubmsg demo`, the README's first command, runs end to end (hub process SIGKILLed and
//! restarted, devices behind the chaos link) and loses nothing.

use std::process::Command;

#[test]
fn the_demo_loses_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_hubmsg"))
        .args(["demo", "--duration", "6s", "--devices", "3", "--seed", "7"])
        .output()
        .expect("run hubmsg demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hubmsg demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("nothing lost."), "{stdout}");
    assert!(stdout.contains("hub SIGKILL + restart"), "{stdout}");
}
