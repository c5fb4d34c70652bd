//! Routes the engine's `tracing` events to a C log callback.
//!
//! A minimal `tracing` subscriber is installed as the process-wide default the first time a
//! callback is set (once per process; `HUBMSG_USAGE` if the host already installed another);
//! later calls only swap the callback and the level. Events of every thread go to the callback,
//! which therefore may run concurrently on several threads, runtime threads included.
//!
//! Invariants: an event raised while the callback runs on the same thread is dropped (no
//! recursion); a replaced callback's `drop` runs once no thread is inside it.

use std::ffi::{c_char, c_void};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use hubmsg_core::{Error, ErrorKind};
use parking_lot::RwLock;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

use crate::args::{arg_enum, arg_ref};
use crate::callback::Closure;
use crate::result::{guard, hubmsg_result, to_cstring, HUBMSG_OK};

/// Log level: nothing.
pub const HUBMSG_LOG_OFF: i32 = 0;
/// Log level: errors.
pub const HUBMSG_LOG_ERROR: i32 = 1;
/// Log level: warnings and above.
pub const HUBMSG_LOG_WARN: i32 = 2;
/// Log level: information and above.
pub const HUBMSG_LOG_INFO: i32 = 3;
/// Log level: debugging and above.
pub const HUBMSG_LOG_DEBUG: i32 = 4;
/// Log level: everything.
pub const HUBMSG_LOG_TRACE: i32 = 5;

/// Receives the engine's log events.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct hubmsg_log_callback {
    /// Passed to `call` and `drop`; owned by hubmsg once set.
    pub context: *mut c_void,
    /// Called with a HUBMSG_LOG_* level, the emitting module (e.g. `hubmsg_core::device`) and
    /// the message with its fields (`connection failed error=…`); both strings are valid during
    /// the call. Runs on whichever thread logged, possibly several at once and possibly a
    /// runtime thread (where blocking hubmsg calls return HUBMSG_USAGE): keep it short and
    /// thread-safe.
    pub call: Option<unsafe extern "C-unwind" fn(context: *mut c_void, level: i32, target: *const c_char, message: *const c_char)>,
    /// Called once with `context` when the callback is replaced or removed (may be NULL).
    pub drop: Option<unsafe extern "C-unwind" fn(context: *mut c_void)>,
}

type LogFn = unsafe extern "C-unwind" fn(*mut c_void, i32, *const c_char, *const c_char);

static MAX_LEVEL: AtomicI32 = AtomicI32::new(HUBMSG_LOG_OFF);
static CALLBACK: RwLock<Option<Arc<Closure<LogFn>>>> = RwLock::new(None);
static INSTALLED: OnceLock<bool> = OnceLock::new();

thread_local! {
    static IN_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn level_code(l: &Level) -> i32 {
    match *l {
        Level::ERROR => HUBMSG_LOG_ERROR,
        Level::WARN => HUBMSG_LOG_WARN,
        Level::INFO => HUBMSG_LOG_INFO,
        Level::DEBUG => HUBMSG_LOG_DEBUG,
        _ => HUBMSG_LOG_TRACE,
    }
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
struct CallbackSubscriber {
    next_span: AtomicU64,
}

impl Subscriber for CallbackSubscriber {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes() // the level can change at any time
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
        if IN_CALLBACK.with(|c| c.replace(true)) {
            return;
        }
        let cb = CALLBACK.read().clone();
        if let Some(cb) = cb {
            let mut text = Text::default();
            event.record(&mut text);
            let message = to_cstring(&(text.message + &text.fields));
            let target = to_cstring(event.metadata().target());
            let level = level_code(event.metadata().level());
            // SAFETY: the user's callback with its own context; the strings live during the call.
            cb.invoke(|f: LogFn, ctx| unsafe { f(ctx, level, target.as_ptr(), message.as_ptr()) });
        }
        IN_CALLBACK.with(|c| c.set(false));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Sets (or, with NULL, removes) the process-wide log callback and its level. The first call
/// installs hubmsg's `tracing` subscriber as the process default.
///
/// @param callback The callback (copied; hubmsg owns its context from now on), or NULL to remove
///        the current one (its `drop` runs).
/// @param max_level The most verbose level passed on: HUBMSG_LOG_OFF … HUBMSG_LOG_TRACE.
/// @return HUBMSG_OK, HUBMSG_INVALID_ARGUMENT (level out of range, `call` NULL), or HUBMSG_USAGE
///         (another `tracing` subscriber is already the process default).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_set_log_callback(callback: *const hubmsg_log_callback, max_level: i32) -> hubmsg_result {
    guard(|| {
        let levels = [
            (HUBMSG_LOG_OFF, "HUBMSG_LOG_OFF", ()),
            (HUBMSG_LOG_ERROR, "HUBMSG_LOG_ERROR", ()),
            (HUBMSG_LOG_WARN, "HUBMSG_LOG_WARN", ()),
            (HUBMSG_LOG_INFO, "HUBMSG_LOG_INFO", ()),
            (HUBMSG_LOG_DEBUG, "HUBMSG_LOG_DEBUG", ()),
            (HUBMSG_LOG_TRACE, "HUBMSG_LOG_TRACE", ()),
        ];
        arg_enum(max_level, "max_level", &levels)?;
        let new = if callback.is_null() {
            None
        } else {
            // SAFETY: the C API contract for `callback`.
            let cb = unsafe { arg_ref(callback, "callback") }?;
            Some(Closure::<LogFn>::new("log callback", cb.context, cb.call, cb.drop)?)
        };
        let installed =
            *INSTALLED.get_or_init(|| tracing::subscriber::set_global_default(CallbackSubscriber { next_span: AtomicU64::new(1) }).is_ok());
        if !installed && new.is_some() {
            return Err(Error::new(
                ErrorKind::Usage,
                "another tracing subscriber is already the process default; hubmsg cannot route logs to a callback",
            ));
        }
        MAX_LEVEL.store(if new.is_some() { max_level } else { HUBMSG_LOG_OFF }, Ordering::SeqCst);
        let old = std::mem::replace(&mut *CALLBACK.write(), new);
        drop(old); // runs the old `drop` once every in-flight call has released its reference
        Ok(HUBMSG_OK)
    })
}
