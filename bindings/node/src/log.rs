//! Engine logs to a JS function: `setLogHandler((level, target, message) => …, 'debug')`.
//!
//! The engine's `tracing` events reach a `hubmsg_bind::log` sink on whatever thread logged; the
//! sink hands each record to a threadsafe function without blocking (a full or closing queue
//! drops the record), so the handler runs on the JS thread and never stalls the engine. The
//! function is weak: a log handler alone does not keep Node running. `index.js` installs a
//! `console.error` handler when `HUBMSG_LOG` is set (`HUBMSG_LOG=debug node app.js`).

use std::sync::Arc;

use hubmsg_bind::log::{set_sink, Binding, LevelCode, LogSink};
use napi::bindgen_prelude::FnArgs;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;
use tracing::Level;

use crate::errors::{invalid, IntoJs};

type Args = FnArgs<(String, String, String)>;
type Handler = ThreadsafeFunction<Args, (), Args, Status, false, true, 10_000>;

struct JsSink(Handler);

impl LogSink for JsSink {
    fn log(&self, level: Level, target: &str, message: &str) {
        let level = level.as_str().to_ascii_lowercase();
        self.0.call((level, target.to_string(), message.to_string()).into(), ThreadsafeFunctionCallMode::NonBlocking);
    }
}

fn level_code(level: &str) -> napi::Result<LevelCode> {
    Ok(match level {
        "off" => 0,
        "error" => 1,
        "warn" => 2,
        "info" => 3,
        "debug" => 4,
        "trace" => 5,
        other => return Err(invalid(format!("log level '{other}' is not off, error, warn, info, debug or trace"))),
    })
}

/// Routes engine logs at `level` ("error", "warn", "info" (default), "debug", "trace") and
/// more severe to `handler(level, target, message)` — `target` is the engine module, e.g.
/// `hubmsg_core::device`; `null` removes the handler. The handler runs on the JS thread; it
/// does not keep Node running.
#[napi(
    ts_args_type = "handler: ((level: 'error' | 'warn' | 'info' | 'debug' | 'trace', target: string, message: string) => void) | null, level?: 'off' | 'error' | 'warn' | 'info' | 'debug' | 'trace'"
)]
pub fn set_log_handler(handler: Option<Handler>, level: Option<String>) -> napi::Result<()> {
    let code = level_code(level.as_deref().unwrap_or("info"))?;
    let sink = handler.map(|h| (Arc::new(JsSink(h)) as Arc<dyn LogSink>, code));
    set_sink(Binding::Node, sink).js()?;
    Ok(())
}
