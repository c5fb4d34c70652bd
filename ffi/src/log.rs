//! Routes the engine's `tracing` events to a C log callback, through the shared subscriber of
//! `hubmsg_bind::log` (installed as the process default by the first
//! hubmsg_set_log_callback(); `HUBMSG_USAGE` if the host already installed another). Later calls
//! only swap the callback and the level. Events of every thread go to the callback, which
//! therefore may run concurrently on several threads, runtime threads included.
//!
//! Invariants: an event raised while the callback runs on the same thread is dropped (no
//! recursion); a replaced callback's `drop` runs once no thread is inside it.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use hubmsg_bind::log::{level_code, set_sink, Binding, LogSink};
use tracing::Level;

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

/// The C callback as a log sink.
struct CallbackSink(Arc<Closure<LogFn>>);

impl LogSink for CallbackSink {
    fn log(&self, level: Level, target: &str, message: &str) {
        let message = to_cstring(message);
        let target = to_cstring(target);
        let level = i32::from(level_code(&level));
        // SAFETY: the user's callback with its own context; the strings live during the call.
        self.0.invoke(|f: LogFn, ctx| unsafe { f(ctx, level, target.as_ptr(), message.as_ptr()) });
    }
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
        let new = new.map(|cb| (Arc::new(CallbackSink(cb)) as Arc<dyn LogSink>, max_level as u8));
        let old = set_sink(Binding::C, new)?;
        drop(old); // runs the old `drop` once every in-flight call has released its reference
        Ok(HUBMSG_OK)
    })
}
