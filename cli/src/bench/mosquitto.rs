//! Mosquitto 2.0 (Debian's package) as a baseline: `persistence true` with its database in the
//! run's scratch space, a listener on 127.0.0.1 and a free port. Mosquitto writes its in-memory
//! database to disk every `autosave_interval` (1,800 s by default) and at exit: its PUBACK does
//! not wait for a disk write.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hubmsg_core::Error;

use super::broker::{first_line, Broker};
use super::install;
use super::mqtt::Target;

/// The mosquitto binary, installing Debian's package when missing (as root).
pub fn ensure_installed() -> Result<PathBuf, String> {
    install::apt_install("Mosquitto", &["mosquitto"], || install::find_binary("mosquitto", &["/usr/sbin", "/usr/local/sbin"]))
}

/// The configuration the baseline runs with.
pub fn config(port: u16, dir: &Path, root: bool) -> String {
    let mut c = format!(
        "# written by hubmsg bench\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence true\n\
         persistence_location {}/\n\
         # as many unacknowledged deliveries per subscriber as a hubmsg consumer has per partition\n\
         max_inflight_messages 1000\n\
         # never drop queued QoS 1 messages of the persistent subscriber (every id is counted)\n\
         max_queued_messages 0\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n",
        dir.display()
    );
    if root {
        // Otherwise mosquitto drops to its own user, which cannot write the temp directory.
        c.push_str("user root\n");
    }
    c
}

/// Starts `bin` with [`config`] in `dir`.
pub async fn start(bin: &Path, dir: &Path) -> Result<Broker, Error> {
    let port = crate::hubproc::free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, config(port, dir, install::is_root())).map_err(|e| Error::storage(format!("write {}", conf.display()), e))?;
    let version = first_line(Command::new(bin).arg("-h")).trim_start_matches("mosquitto version ").to_string();
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(&conf);
    let target = Target { port, username: String::new(), password: String::new() };
    let mut b = Broker::spawn("Mosquitto", cmd, target, &dir.join("mosquitto.log"), Duration::from_secs(10), None).await?;
    b.version = version;
    b.setting = "persistence true".into();
    b.acks_after_disk = false;
    Ok(b)
}
