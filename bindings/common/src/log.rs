//! Routes the engine's `tracing` events to the bindings' log sinks (the C log callback, Python's
//! `logging`).
//!
//! A minimal `tracing` subscriber is installed as the process-wide default the first time a sink
//! is set (once per process; `Usage` if the host already installed another); later calls only
//! swap sinks and levels. Each binding has its own slot ([`Binding`]), so a process that loads
//! the C library and the Python package keeps both. Events of every thread go to every sink
//! whose level admits them, synchronously, on the thread that logged (runtime threads included):
//! a sink must be thread-safe and must not block.
//!
//! Invariants: an event raised while a sink runs on the same thread is dropped (no recursion);
//! a replaced sink is dropped once no thread is inside it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use hubmsg_core::{Error, ErrorKind, Result};
use parking_lot::RwLock;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

/// Receives formatted engine log events.
pub trait LogSink: Send + Sync + 'static {
    /// One event: its level, the emitting module (`hubmsg_core::device`) and the message with
    /// its fields (`connection failed error=…`). Called on the thread that logged.
    fn log(&self, level: Level, target: &str, message: &str);
}

/// Which binding a sink belongs to (one slot each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// The C library's `hubmsg_set_log_callback`.
    C = 0,
    /// The Python package's bridge to `logging`.
    Python = 1,
    /// The Node package.
    Node = 2,
}

/// How verbose a sink is: 0 = off, 1 = error … 5 = trace.
pub type LevelCode = u8;

/// The level code of a `tracing` level (error 1 … trace 5).
pub fn level_code(l: &Level) -> LevelCode {
    match *l {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        _ => 5,
    }
}

type Slot = Option<(Arc<dyn LogSink>, LevelCode)>;

static SINKS: RwLock<[Slot; 3]> = RwLock::new([None, None, None]);
/// The most verbose level of any sink (checked before anything is formatted).
static MAX_LEVEL: AtomicU8 = AtomicU8::new(0);
static INSTALLED: OnceLock<bool> = OnceLock::new();

thread_local! {
    static IN_SINK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Formats the `message` field first, then the others as `name=value`.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={:?}", field.name(), value);
        }
    }
}

/// The subscriber: events only (spans get ids and are otherwise ignored).
struct SinkSubscriber {
    next_span: AtomicU64,
}

impl Subscriber for SinkSubscriber {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes() // levels can change at any time
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && level_code(metadata.level()) <= MAX_LEVEL.load(Ordering::Relaxed)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed).max(1))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        if IN_SINK.with(|c| c.replace(true)) {
            return;
        }
        let level = *event.metadata().level();
        let code = level_code(&level);
        let sinks: Vec<Arc<dyn LogSink>> = SINKS.read().iter().flatten().filter(|(_, max)| code <= *max).map(|(s, _)| s.clone()).collect();
        if !sinks.is_empty() {
            let mut text = Text::default();
            event.record(&mut text);
            let message = text.message + &text.fields;
            for sink in sinks {
                crate::dispatch::call_user("log sink", || sink.log(level, event.metadata().target(), &message));
            }
        }
        IN_SINK.with(|c| c.set(false));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Sets (or, with `None`, removes) `binding`'s sink with its most verbose level (0 = off …
/// 5 = trace). The first call installs the subscriber as the process default; `Usage` if another
/// `tracing` subscriber already is. Returns the replaced sink, if any.
pub fn set_sink(binding: Binding, sink: Option<(Arc<dyn LogSink>, LevelCode)>) -> Result<Option<Arc<dyn LogSink>>> {
    let installed =
        *INSTALLED.get_or_init(|| tracing::subscriber::set_global_default(SinkSubscriber { next_span: AtomicU64::new(1) }).is_ok());
    if !installed && sink.is_some() {
        return Err(Error::new(
            ErrorKind::Usage,
            "another tracing subscriber is already the process default; hubmsg cannot route its logs",
        ));
    }
    let mut sinks = SINKS.write();
    let old = std::mem::replace(&mut sinks[binding as usize], sink.map(|(s, l)| (s, l.min(5))));
    let max = sinks.iter().flatten().map(|(_, l)| *l).max().unwrap_or(0);
    MAX_LEVEL.store(max, Ordering::SeqCst);
    drop(sinks);
    // Every event that is forwarding to the old sink holds its own reference, so it is dropped
    // by the last of them.
    Ok(old.map(|(s, _)| s))
}

/// Changes `binding`'s level without replacing its sink (no-op without one).
pub fn set_level(binding: Binding, level: LevelCode) {
    let mut sinks = SINKS.write();
    if let Some((_, l)) = &mut sinks[binding as usize] {
        *l = level.min(5);
    }
    let max = sinks.iter().flatten().map(|(_, l)| *l).max().unwrap_or(0);
    MAX_LEVEL.store(max, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(parking_lot::Mutex<Vec<(Level, String, String)>>);

    impl LogSink for Collect {
        fn log(&self, level: Level, target: &str, message: &str) {
            self.0.lock().push((level, target.to_string(), message.to_string()));
            tracing::error!("logged from inside a sink"); // dropped: no recursion
        }
    }

    #[test]
    fn events_reach_the_sink_at_its_level_with_fields() {
        let sink = Arc::new(Collect(Default::default()));
        set_sink(Binding::Node, Some((sink.clone(), 2))).unwrap();
        tracing::info!("too verbose");
        tracing::warn!(device = "pump-7", "connection failed");
        set_level(Binding::Node, 3);
        tracing::info!(n = 3, "now wanted");
        let old = set_sink(Binding::Node, None).unwrap();
        assert!(old.is_some());
        tracing::error!("after removal");
        let got = sink.0.lock().clone();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, Level::WARN);
        assert!(got[0].1.contains("log"), "{got:?}");
        assert_eq!(got[0].2, "connection failed device=pump-7");
        assert_eq!(got[1].2, "now wanted n=3");
    }
}
