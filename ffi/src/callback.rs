//! User callbacks (`{context, call, drop}`) taken over from C.
//!
//! They run on their client's callback thread (`hubmsg_bind::Dispatcher`): the engine's tasks
//! never call user code, they post jobs to it. So callbacks of one client run one at a time, in
//! order, never on a runtime thread, and may call any hubmsg function — including blocking ones
//! and the client's own `_free`. A [`Closure`]'s `drop` runs exactly once, when the last job
//! holding it is gone.

use std::ffi::c_void;
use std::sync::Arc;

use hubmsg_bind::call_user;
use hubmsg_core::{Error, Result};

/// The `drop` member of every callback struct.
pub(crate) type DropFn = unsafe extern "C-unwind" fn(context: *mut c_void);

/// A callback taken over from C: its `context` is now owned by hubmsg, and `drop` runs exactly
/// once, when the last reference goes away.
pub(crate) struct Closure<F: Copy> {
    context: *mut c_void,
    call: F,
    drop: Option<DropFn>,
    what: &'static str,
}

// SAFETY: the C API documents that a callback's context is used from the client's callback
// thread (or, for the log callback, from any thread); C promises it may be.
unsafe impl<F: Copy> Send for Closure<F> {}
// SAFETY: as above; hubmsg never calls one closure from two threads at once except the log
// callback, whose contract says so.
unsafe impl<F: Copy> Sync for Closure<F> {}

impl<F: Copy> Closure<F> {
    /// Takes over a callback struct's members; `call` must not be NULL.
    pub(crate) fn new(what: &'static str, context: *mut c_void, call: Option<F>, drop: Option<DropFn>) -> Result<Arc<Closure<F>>> {
        let call = call.ok_or_else(|| Error::invalid(format!("{what}.call is NULL")))?;
        Ok(Arc::new(Closure { context, call, drop, what }))
    }

    /// Calls the user function (`f` gets the function and the context); a panic is caught.
    pub(crate) fn invoke(&self, f: impl FnOnce(F, *mut c_void)) {
        call_user(self.what, || f(self.call, self.context));
    }

    /// Lends `value` to the user function for the duration of the call (`f` gets the function,
    /// the context and a pointer to it) and returns it afterwards.
    pub(crate) fn lend<U>(&self, mut value: U, f: impl FnOnce(F, *mut c_void, *mut U)) -> U {
        let p: *mut U = &mut value;
        self.invoke(|call, ctx| f(call, ctx, p));
        value
    }
}

impl<F: Copy> Drop for Closure<F> {
    fn drop(&mut self) {
        if let Some(d) = self.drop {
            let ctx = self.context;
            // SAFETY: the user's own drop function with the user's own context, called once.
            call_user(self.what, || unsafe { d(ctx) });
        }
    }
}
