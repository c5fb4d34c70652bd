//! Builds the C tests and the C examples with `gcc -std=c11 -Wall -Wextra -Werror -pedantic`
//! against the freshly built `libhubmsg.so` and runs them; under `CI=true` or
//! `HUBMSG_VALGRIND=1` also runs them under valgrind (`--leak-check=full --error-exitcode=1`).
//!
//! Each C program prints `c-test ok <name>` per passing test case; those lines are also appended
//! to `target/c-tests.log`, which `tests/all.sh` turns into its `c: N passed, N failed` line.

#![cfg(feature = "hub")] // the C tests start embedded hubs

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The C programs share two cores with everything else: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `target/<profile>/deps`: where `cargo test` builds `libhubmsg.so` for this run (it is not
/// copied up to `target/<profile>` by `cargo test`, only by `cargo build`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().to_path_buf(); // …/deps/c_suite-…
    assert!(dir.join("libhubmsg.so").exists(), "libhubmsg.so not found in {}", dir.display());
    dir
}

/// `target/c-tests.log`.
fn results_log() -> PathBuf {
    lib_dir().parent().unwrap().parent().unwrap().join("c-tests.log")
}

/// Compiles `sources` into `name` in the test's scratch directory.
fn compile(name: &str, sources: &[PathBuf]) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c").join(name);
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let lib = lib_dir();
    let output = Command::new(std::env::var("CC").unwrap_or_else(|_| "gcc".into()))
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g", "-O1"])
        .arg(format!("-I{}", repo().join("include").display()))
        .arg(format!("-I{}", repo().join("ffi/tests/c").display()))
        .args(sources)
        .arg("-o")
        .arg(&out)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lhubmsg", "-pthread"])
        .output()
        .expect("run the C compiler (gcc)");
    assert!(output.status.success(), "compiling {name} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    out
}

struct Run {
    ok: Vec<String>,
    stdout: String,
}

/// Runs `exe` (under valgrind when `valgrind`), bounded by `limit`; asserts exit status 0 and
/// no `c-test FAIL` line; logs every case for tests/all.sh.
fn run(exe: &Path, args: &[&str], valgrind: bool, limit: Duration) -> Run {
    let scratch = tempfile::tempdir().unwrap();
    let name = exe.file_name().unwrap().to_string_lossy().to_string();
    let mut cmd = if valgrind {
        let mut c = Command::new("valgrind");
        c.args([
            "--leak-check=full",
            "--error-exitcode=1",
            "--errors-for-leak-kinds=definite,indirect,possible",
            "--show-leak-kinds=definite,indirect,possible",
        ])
        .arg(format!("--suppressions={}", repo().join("ffi/tests/c/valgrind.supp").display()))
        .arg(exe);
        c.env("HUBMSG_SLOW", "1");
        c
    } else {
        Command::new(exe)
    };
    // cargo's LD_LIBRARY_PATH may name target/<profile> first, whose libhubmsg.so is whatever
    // `cargo build` left there (maybe other features); the rpath to deps/ must decide.
    cmd.env_remove("LD_LIBRARY_PATH");
    // Device outboxes without a directory go to $HUBMSG_OUTBOX_DIR/<host name>/<device id>: keep them in
    // the scratch directory, not in the user's home.
    cmd.args(args)
        .env("HUBMSG_TEST_DIR", scratch.path())
        .env("HUBMSG_OUTBOX_DIR", scratch.path().join("outboxes"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).unwrap();
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (out_t.join().unwrap(), err_t.join().unwrap());
    let prefix = if valgrind { "valgrind/" } else { "" };
    let mut ok = Vec::new();
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(results_log()).unwrap();
    for line in stdout.lines() {
        if let Some(case) = line.strip_prefix("c-test ok ") {
            ok.push(case.to_string());
            writeln!(log, "ok {prefix}{name}/{case}").unwrap();
        } else if let Some(case) = line.strip_prefix("c-test FAIL ") {
            writeln!(log, "FAIL {prefix}{name}/{case}").unwrap();
        }
    }
    let passed = status.is_some_and(|s| s.success());
    if !passed {
        writeln!(log, "FAIL {prefix}{name}/(exit)").unwrap();
    } else if ok.is_empty() {
        // An example: the whole program is one case.
        writeln!(log, "ok {prefix}{name}").unwrap();
    }
    assert!(
        passed,
        "{prefix}{name} {} after {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        match status {
            Some(s) => format!("exited with {s}"),
            None => format!("was killed at the time limit of {limit:?}"),
        },
        started.elapsed()
    );
    Run { ok, stdout }
}

fn test_source(name: &str) -> PathBuf {
    repo().join("ffi/tests/c").join(name)
}

fn example(name: &str) -> PathBuf {
    compile(name, &[repo().join("examples/c").join(format!("{name}.c"))])
}

/// The function names hubmsg.h declares.
fn declared_functions() -> Vec<String> {
    let header = std::fs::read_to_string(repo().join("include/hubmsg.h")).unwrap();
    let mut names = Vec::new();
    for line in header.lines() {
        if line.starts_with(' ') || line.starts_with('*') || line.starts_with('/') || line.starts_with('#') || line.starts_with("typedef") {
            continue;
        }
        if let Some(paren) = line.find('(') {
            if let Some(start) = line[..paren].rfind("hubmsg_") {
                names.push(line[start..paren].to_string());
            }
        }
    }
    names
}

#[test]
fn every_exported_function_is_exercised_with_bad_arguments() {
    let names = declared_functions();
    assert!(names.len() > 80, "parsed only {} functions from hubmsg.h", names.len());
    let src = std::fs::read_to_string(test_source("null_args.c")).unwrap();
    let missing: Vec<&String> = names.iter().filter(|n| !src.contains(&format!("{n}("))).collect();
    assert!(missing.is_empty(), "null_args.c does not call: {missing:?}");
}

#[test]
fn null_and_invalid_arguments_return_documented_codes() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let exe = compile("null_args", &[test_source("null_args.c")]);
    let r = run(&exe, &[], false, Duration::from_secs(60));
    assert_eq!(r.ok.len(), 7, "{}", r.stdout);
}

#[test]
fn end_to_end_through_an_embedded_hub() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let exe = compile("e2e", &[test_source("e2e.c")]);
    let r = run(&exe, &[], false, Duration::from_secs(120));
    assert!(r.ok.iter().any(|c| c == "free_inside_own_callback"), "{}", r.stdout);
    assert!(r.ok.iter().any(|c| c == "log_callback_released"), "{}", r.stdout);
}

#[test]
fn examples_build_and_run() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let r = run(&example("send_telemetry"), &["200"], false, Duration::from_secs(60));
    assert!(r.stdout.contains("delivered 200 of 200"), "{}", r.stdout);
    let r = run(&example("receive_commands"), &["5"], false, Duration::from_secs(60));
    assert!(r.stdout.contains("received 5 commands"), "{}", r.stdout);
    let r = run(&example("service_monitor"), &["20"], false, Duration::from_secs(60));
    assert!(r.stdout.contains("received 20 events"), "{}", r.stdout);
}

#[test]
fn offline_buffering_loses_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let r = run(&example("offline_buffering"), &["300"], false, Duration::from_secs(120));
    assert!(r.stdout.contains("sent 300 while the hub was down, received 300 distinct, lost 0"), "{}", r.stdout);
}

/// `ffi/pkgconfig.sh` produces a hubmsg.pc that a firmware build can use as is:
/// `cc … $(pkg-config --cflags --libs hubmsg)` builds and runs an example.
#[test]
fn pkg_config_file_builds_an_example() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(repo().join("ffi/pkgconfig.sh")).arg(lib_dir()).arg(out.path()).status().expect("run ffi/pkgconfig.sh");
    assert!(status.success());
    let pc = std::fs::read_to_string(out.path().join("hubmsg.pc")).unwrap();
    assert!(pc.contains(&format!("includedir={}", repo().join("include").display())), "{pc}");
    assert!(pc.contains(&format!("libdir={}", lib_dir().display())), "{pc}");
    assert!(pc.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))), "{pc}");
    let flags = match Command::new("pkg-config").args(["--cflags", "--libs", "hubmsg"]).env("PKG_CONFIG_PATH", out.path()).output() {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap(),
        Ok(o) => panic!("pkg-config cannot use the file: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => {
            println!("skipped the pkg-config build: pkg-config is not installed (the file was checked)");
            return;
        }
    };
    let exe = out.path().join("send_telemetry");
    let cc = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gcc -std=c11 -Wall -Wextra -Werror -pedantic -o {} {} {flags}",
            exe.display(),
            repo().join("examples/c/send_telemetry.c").display()
        ))
        .output()
        .unwrap();
    assert!(cc.status.success(), "{}", String::from_utf8_lossy(&cc.stderr));
    let r = run(&exe, &["3"], false, Duration::from_secs(60));
    assert!(r.stdout.contains("delivered 3 of 3"), "{}", r.stdout);
}

/// The whole C suite under valgrind: in CI (`CI=true`) or with `HUBMSG_VALGRIND=1`.
#[test]
fn c_suite_is_valgrind_clean() {
    let wanted = std::env::var("CI").is_ok_and(|v| v == "true") || std::env::var("HUBMSG_VALGRIND").is_ok_and(|v| v == "1");
    let skip = |why: &str| {
        println!("skipped: {why}");
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(results_log()).unwrap();
        writeln!(log, "SKIP valgrind: {why}").unwrap();
    };
    if !wanted {
        return skip("valgrind runs only with CI=true or HUBMSG_VALGRIND=1");
    }
    if Command::new("valgrind").arg("--version").output().map_or(true, |o| !o.status.success()) {
        return skip("valgrind is not installed (apt-get install valgrind)");
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let limit = Duration::from_secs(600);
    run(&compile("null_args", &[test_source("null_args.c")]), &[], true, limit);
    run(&compile("e2e", &[test_source("e2e.c")]), &[], true, limit);
    let r = run(&example("offline_buffering"), &["50"], true, limit);
    assert!(r.stdout.contains("lost 0"), "{}", r.stdout);
    run(&example("send_telemetry"), &["50"], true, limit);
}
