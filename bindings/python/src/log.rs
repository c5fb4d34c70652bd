//! Engine logs to the standard `logging` module (logger `hubmsg`).
//!
//! The engine's `tracing` events reach a `hubmsg_bind::log` sink on whatever thread logged
//! (runtime threads included). Calling into Python there could deadlock (a Python thread may
//! hold the GIL while waiting for an engine lock the logging thread holds), so the sink only
//! queues the record; one log thread takes the GIL and hands records to
//! `logging.getLogger("hubmsg")`, which applies its own level and handlers. Levels: error →
//! ERROR, warn → WARNING, info → INFO, debug → DEBUG, trace → 5. Each record carries the Rust
//! module as `record.hubmsg_target`.

use std::sync::mpsc;

use hubmsg_bind::log::{set_sink, Binding, LogSink};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tracing::Level;

type Record = (Level, String, String);

struct QueueSink {
    tx: Mutex<Option<(u32, mpsc::Sender<Record>)>>,
}

impl QueueSink {
    /// The sender of this process's log thread (started on first use, again after fork()).
    fn sender(&self) -> Option<mpsc::Sender<Record>> {
        let mut g = self.tx.lock();
        let pid = std::process::id();
        if let Some((p, tx)) = g.as_ref() {
            if *p == pid {
                return Some(tx.clone());
            }
        }
        let (tx, rx) = mpsc::channel::<Record>();
        std::thread::Builder::new().name("hubmsg-log".into()).spawn(move || forward(rx)).ok()?;
        *g = Some((pid, tx.clone()));
        Some(tx)
    }
}

impl LogSink for QueueSink {
    fn log(&self, level: Level, target: &str, message: &str) {
        if let Some(tx) = self.sender() {
            let _ = tx.send((level, target.to_string(), message.to_string()));
        }
    }
}

fn python_level(l: Level) -> u32 {
    match l {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        _ => 5,
    }
}

/// The log thread: each record to `logging.getLogger("hubmsg")`.
fn forward(rx: mpsc::Receiver<Record>) {
    while let Ok((level, target, message)) = rx.recv() {
        let ran = crate::aio::with_python(|py| {
            let r = (|| -> PyResult<()> {
                let logger = py.import("logging")?.call_method1("getLogger", ("hubmsg",))?;
                let lvl = python_level(level);
                if logger.call_method1("isEnabledFor", (lvl,))?.is_truthy()? {
                    let extra = PyDict::new(py);
                    extra.set_item("hubmsg_target", &target)?;
                    let kw = PyDict::new(py);
                    kw.set_item("extra", extra)?;
                    logger.call_method("log", (lvl, "%s", &message), Some(&kw))?;
                }
                Ok(())
            })();
            if let Err(e) = r {
                e.print(py);
            }
        });
        if ran.is_none() {
            return; // the interpreter is exiting
        }
    }
}

/// Installs the sink (debug and above; `logging` filters further).
pub(crate) fn install() -> PyResult<()> {
    let sink: std::sync::Arc<dyn LogSink> = std::sync::Arc::new(QueueSink { tx: Mutex::new(None) });
    match set_sink(Binding::Python, Some((sink, 4))) {
        Ok(_) => Ok(()),
        // Another tracing subscriber is the process default (e.g. the host embeds Rust that
        // set one): hubmsg's logs go there instead; importing still works.
        Err(_) => Ok(()),
    }
}
