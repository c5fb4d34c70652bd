//! The device client: options, send with per-message outcomes, flush, C2D receive (pull or
//! callback) with complete / abandon / reject, connection status, stats.
//!
//! `hubmsg_device` is thread-safe: any application thread may send, flush or read stats at the
//! same time. Its callbacks (status, C2D, outcomes) run on the device's own callback thread, one
//! at a time, never on a runtime thread; they may call any hubmsg function, including
//! hubmsg_device_free() on their own device.

use std::ffi::{c_char, c_void, CString};
use std::sync::{Arc, Condvar, Mutex as StdMutex};
use std::time::{Duration, Instant};

use hubmsg_core::device::{C2dMessage, DeviceStats};
use hubmsg_core::outbox::{Outcome, Overflow};
use hubmsg_core::retry::RetryPolicy;
use hubmsg_core::store::Durability;
use hubmsg_core::transport::TlsOptions;
use hubmsg_core::{ConnectionStatus, Credential, DeviceClient, DeviceOptions, Error, ErrorKind, Result};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::args::{arg_enum, arg_mut, arg_ref, arg_str, free_box, free_handle, ms, opt_str, Out};
use crate::callback::Closure;
use crate::message::hubmsg_message;
use crate::result::{code_of, guard, guard_or, hubmsg_result, to_cstring, HUBMSG_OK, HUBMSG_PENDING};
use hubmsg_bind::sources::C2dSource;
use hubmsg_bind::{block_on, dispose, ensure_may_block, runtime, Rt};
use hubmsg_bind::{Dispatcher, Inbox};

/// Outbox overflow policy: refuse the new message with HUBMSG_QUEUE_FULL (default).
pub const HUBMSG_OVERFLOW_REJECT: i32 = 0;
/// Outbox overflow policy: drop the oldest messages (outcome HUBMSG_OUTCOME_DROPPED, counted).
pub const HUBMSG_OVERFLOW_DROP_OLDEST: i32 = 1;

/// Durability: fdatasync before send() returns (group commit; default).
pub const HUBMSG_DURABILITY_ALWAYS: i32 = 0;
/// Durability: send() returns once written to the OS; fdatasync every `interval_ms`.
pub const HUBMSG_DURABILITY_INTERVAL: i32 = 1;
/// Durability: send() returns once written to the OS; never fdatasync'd explicitly.
pub const HUBMSG_DURABILITY_NEVER: i32 = 2;

/// "No limit" for durations given as `uint64_t` milliseconds (e.g. a retry's max elapsed time).
pub const HUBMSG_FOREVER: u64 = u64::MAX;

/// Outcome of a sent message: the hub acknowledged it (durable at the hub).
pub const HUBMSG_OUTCOME_DELIVERED: i32 = 0;
/// Outcome of a sent message: its expiry time passed before it could be sent.
pub const HUBMSG_OUTCOME_EXPIRED: i32 = 1;
/// Outcome of a sent message: the overflow policy drop_oldest removed it.
pub const HUBMSG_OUTCOME_DROPPED: i32 = 2;
/// Outcome of a sent message: the receiver refused it.
pub const HUBMSG_OUTCOME_REJECTED: i32 = 3;

/// Connection status: dialing / waiting for the hub's answer.
pub const HUBMSG_STATUS_CONNECTING: i32 = 0;
/// Connection status: connected.
pub const HUBMSG_STATUS_CONNECTED: i32 = 1;
/// Connection status: the connection dropped (a retry follows).
pub const HUBMSG_STATUS_DISCONNECTED: i32 = 2;
/// Connection status: waiting before the next attempt.
pub const HUBMSG_STATUS_RETRYING: i32 = 3;
/// Connection status: gave up (bad credentials, disabled device, retry policy exhausted);
/// messages stay queued; hubmsg_device_reconnect() tries again.
pub const HUBMSG_STATUS_FAILED: i32 = 4;
/// Connection status: closed by the application.
pub const HUBMSG_STATUS_CLOSED: i32 = 5;

pub(crate) const DURABILITIES: &[(i32, &str, u8)] = &[
    (HUBMSG_DURABILITY_ALWAYS, "HUBMSG_DURABILITY_ALWAYS", 0),
    (HUBMSG_DURABILITY_INTERVAL, "HUBMSG_DURABILITY_INTERVAL", 1),
    (HUBMSG_DURABILITY_NEVER, "HUBMSG_DURABILITY_NEVER", 2),
];

/// A durability mode from C.
pub(crate) fn durability_arg(mode: i32, interval_ms: u32) -> Result<Durability> {
    Ok(match arg_enum(mode, "durability", DURABILITIES)? {
        0 => Durability::Always,
        1 if interval_ms == 0 => return Err(Error::invalid("HUBMSG_DURABILITY_INTERVAL needs interval_ms > 0")),
        1 => Durability::Interval(ms(interval_ms)),
        _ => Durability::Never,
    })
}

fn outcome_code(o: Outcome) -> i32 {
    match o {
        Outcome::Delivered => HUBMSG_OUTCOME_DELIVERED,
        Outcome::Expired => HUBMSG_OUTCOME_EXPIRED,
        Outcome::Dropped => HUBMSG_OUTCOME_DROPPED,
        Outcome::Rejected => HUBMSG_OUTCOME_REJECTED,
    }
}

/// (status code, error code, reason) of a core status.
pub(crate) fn status_parts(s: &ConnectionStatus) -> (i32, hubmsg_result, String) {
    match s {
        ConnectionStatus::Connecting => (HUBMSG_STATUS_CONNECTING, HUBMSG_OK, String::new()),
        ConnectionStatus::Connected => (HUBMSG_STATUS_CONNECTED, HUBMSG_OK, String::new()),
        ConnectionStatus::Disconnected { reason } => (HUBMSG_STATUS_DISCONNECTED, HUBMSG_OK, reason.clone()),
        ConnectionStatus::Retrying { attempt, delay } => {
            (HUBMSG_STATUS_RETRYING, HUBMSG_OK, format!("attempt {attempt} in {} ms", delay.as_millis()))
        }
        ConnectionStatus::Failed { kind, reason } => (HUBMSG_STATUS_FAILED, code_of(*kind), reason.clone()),
        ConnectionStatus::Closed => (HUBMSG_STATUS_CLOSED, HUBMSG_OK, String::new()),
    }
}

// ---------------------------------------------------------------------------------------------
// Options

/// Device client settings, built before hubmsg_device_new(). Not thread-safe.
#[allow(non_camel_case_types)]
pub struct hubmsg_device_options {
    opts: DeviceOptions,
    has_credential: bool,
}

/// Creates device options for `device_id` at `host_name`, with defaults for everything else
/// (a durable outbox of 100,000 messages / 64 MiB in the default directory of the hub and device id —
/// see hubmsg_device_options_set_outbox_dir() —, reject when full, durability always,
/// exponential retry 1 s → 60 s forever). Set a key or a SAS token before creating the device.
///
/// @param host_name The hub's host name; `host:port` selects plain TCP to a local hub, a bare
///        host TLS on 8883.
/// @param device_id The device id.
/// @param out Receives the options (NULL on failure); free with hubmsg_device_options_free().
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_new(
    host_name: *const c_char,
    device_id: *const c_char,
    out: *mut *mut hubmsg_device_options,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (out, host, id) = unsafe { (Out::new(out, "out")?, arg_str(host_name, "host_name")?, arg_str(device_id, "device_id")?) };
        out.put(hubmsg_device_options {
            opts: DeviceOptions::new(host, id, Credential::SymmetricKey(String::new())),
            has_credential: false,
        });
        Ok(HUBMSG_OK)
    })
}

/// Creates device options from a device connection string
/// (`HostName=…;DeviceId=…;SharedAccessKey=…` or `…;SharedAccessSignature=…`), with the
/// defaults of hubmsg_device_options_new().
///
/// @param connection_string The device connection string.
/// @param out Receives the options (NULL on failure); free with hubmsg_device_options_free().
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT (malformed, or a service connection string).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_from_connection_string(
    connection_string: *const c_char,
    out: *mut *mut hubmsg_device_options,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (out, cs) = unsafe { (Out::new(out, "out")?, arg_str(connection_string, "connection_string")?) };
        out.put(hubmsg_device_options { opts: DeviceOptions::from_connection_string(cs)?, has_credential: true });
        Ok(HUBMSG_OK)
    })
}

/// Frees device options. NULL is a no-op.
///
/// @param opts The options, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_free(opts: *mut hubmsg_device_options) {
    // SAFETY: the C API contract for `opts`.
    unsafe { free_handle(opts) }
}

unsafe fn with_options(opts: *mut hubmsg_device_options, f: impl FnOnce(&mut hubmsg_device_options) -> Result<()>) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `opts`.
        f(unsafe { arg_mut(opts, "opts") }?)?;
        Ok(HUBMSG_OK)
    })
}

/// Authenticates with the device's symmetric key; SAS tokens are generated and renewed inside.
///
/// @param opts The options.
/// @param key The base64 key.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT (NULL, or not base64).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_set_key(opts: *mut hubmsg_device_options, key: *const c_char) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe {
        with_options(opts, |o| {
            let key = arg_str(key, "key")?;
            hubmsg_core::auth::sign(key, b"probe")?;
            o.opts.credential = Credential::SymmetricKey(key.into());
            o.has_credential = true;
            Ok(())
        })
    }
}

/// Authenticates with a ready-made SAS token (it cannot be renewed; the client reports
/// HUBMSG_STATUS_FAILED with HUBMSG_UNAUTHORIZED once it expires).
///
/// @param opts The options.
/// @param sas_token The token (`SharedAccessSignature sr=…&sig=…&se=…`).
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_set_sas_token(opts: *mut hubmsg_device_options, sas_token: *const c_char) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe {
        with_options(opts, |o| {
            let token = arg_str(sas_token, "sas_token")?;
            hubmsg_core::auth::SasToken::parse(token)?;
            o.opts.credential = Credential::SasToken(token.into());
            o.has_credential = true;
            Ok(())
        })
    }
}

/// Chooses the directory of the durable outbox, so queued messages survive restarts and power
/// loss. NULL (the default) uses the default directory of the hub and device id:
/// `$HUBMSG_OUTBOX_DIR/<host name>/<device id>`, else `$XDG_STATE_HOME/hubmsg/outbox/<host name>/<device id>`, else
/// `$HOME/.local/state/hubmsg/outbox/<host name>/<device id>`. The directory is locked while the client
/// runs: a second client on it fails with HUBMSG_STORAGE naming the holder's pid.
/// Also turns off an in-memory outbox chosen before.
///
/// @param opts The options.
/// @param dir The directory (created if missing), or NULL for the default one.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_set_outbox_dir(opts: *mut hubmsg_device_options, dir: *const c_char) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe {
        with_options(opts, |o| {
            o.opts.outbox.dir = opt_str(dir, "dir")?.map(Into::into);
            o.opts.outbox.in_memory = false;
            Ok(())
        })
    }
}

/// Keeps the outbox in memory only (non-zero) or on disk (0, the default). In memory, every
/// queued message is lost when the process ends or the machine loses power, and
/// hubmsg_device_send() returning means only "queued".
///
/// @param opts The options.
/// @param in_memory Non-zero for an in-memory outbox.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_set_outbox_in_memory(opts: *mut hubmsg_device_options, in_memory: i32) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe {
        with_options(opts, |o| {
            o.opts.outbox.in_memory = in_memory != 0;
            if o.opts.outbox.in_memory {
                o.opts.outbox.dir = None;
            }
            Ok(())
        })
    }
}

/// Bounds the outbox and chooses what happens when a message does not fit.
///
/// @param opts The options.
/// @param max_messages Most messages held (≥ 1).
/// @param max_bytes Most bytes held (≥ 1).
/// @param overflow HUBMSG_OVERFLOW_REJECT or HUBMSG_OVERFLOW_DROP_OLDEST.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_set_outbox_limits(
    opts: *mut hubmsg_device_options,
    max_messages: u64,
    max_bytes: u64,
    overflow: i32,
) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe {
        with_options(opts, |o| {
            let overflow = arg_enum(
                overflow,
                "overflow",
                &[
                    (HUBMSG_OVERFLOW_REJECT, "HUBMSG_OVERFLOW_REJECT", Overflow::Reject),
                    (HUBMSG_OVERFLOW_DROP_OLDEST, "HUBMSG_OVERFLOW_DROP_OLDEST", Overflow::DropOldest),
                ],
            )?;
            if max_messages == 0 || max_bytes == 0 {
                return Err(Error::invalid("outbox limits must be at least 1 message and 1 byte"));
            }
            o.opts.outbox.max_messages = usize::try_from(max_messages).unwrap_or(usize::MAX);
            o.opts.outbox.max_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
            o.opts.outbox.overflow = overflow;
            Ok(())
        })
    }
}

/// Sets the outbox durability.
///
/// @param opts The options.
/// @param mode HUBMSG_DURABILITY_ALWAYS, HUBMSG_DURABILITY_INTERVAL or HUBMSG_DURABILITY_NEVER.
/// @param interval_ms The fdatasync interval for HUBMSG_DURABILITY_INTERVAL (> 0); ignored
///        otherwise.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_set_durability(
    opts: *mut hubmsg_device_options,
    mode: i32,
    interval_ms: u32,
) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe {
        with_options(opts, |o| {
            o.opts.outbox.durability = durability_arg(mode, interval_ms)?;
            Ok(())
        })
    }
}

/// Sets the reconnect policy: exponential backoff `initial_ms × multiplier^n`, capped at
/// `max_ms`, plus a random jitter in [0, jitter_ms], until `max_elapsed_ms` have passed since the
/// first failure.
///
/// @param opts The options.
/// @param initial_ms Delay before the first retry.
/// @param max_ms Largest delay (≥ initial_ms).
/// @param multiplier Growth per attempt (finite, ≥ 1.0; 1.0 = fixed delay).
/// @param jitter_ms Largest random extra delay.
/// @param max_elapsed_ms Give up after this long (status HUBMSG_STATUS_FAILED), or HUBMSG_FOREVER.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_set_retry(
    opts: *mut hubmsg_device_options,
    initial_ms: u32,
    max_ms: u32,
    multiplier: f64,
    jitter_ms: u32,
    max_elapsed_ms: u64,
) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe {
        with_options(opts, |o| {
            if initial_ms > max_ms {
                return Err(Error::invalid(format!("retry initial_ms {initial_ms} is larger than max_ms {max_ms}")));
            }
            if !multiplier.is_finite() || multiplier < 1.0 {
                return Err(Error::invalid(format!("retry multiplier {multiplier} must be a finite number ≥ 1.0")));
            }
            o.opts.retry = RetryPolicy {
                initial_delay: ms(initial_ms),
                max_delay: ms(max_ms),
                multiplier,
                jitter: ms(jitter_ms),
                max_elapsed: (max_elapsed_ms != HUBMSG_FOREVER).then(|| Duration::from_millis(max_elapsed_ms)),
                max_attempts: None,
                healthy_after: ms(max_ms).clamp(Duration::from_millis(100), Duration::from_secs(10)),
            };
            Ok(())
        })
    }
}

/// Never reconnects: the first failure moves the client to HUBMSG_STATUS_FAILED (messages stay
/// queued; hubmsg_device_reconnect() tries again).
///
/// @param opts The options.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_set_retry_none(opts: *mut hubmsg_device_options) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe {
        with_options(opts, |o| {
            o.opts.retry = RetryPolicy::none();
            Ok(())
        })
    }
}

/// Uses TLS and trusts the CA certificate(s) in a PEM file instead of the built-in web roots
/// (e.g. a local hub's self-signed certificate). NULL restores the default (TLS with web roots
/// for a bare host name, plain TCP for `host:port`).
///
/// @param opts The options.
/// @param ca_file Path of a PEM file, or NULL.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_options_set_ca_file(opts: *mut hubmsg_device_options, ca_file: *const c_char) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe {
        with_options(opts, |o| {
            o.opts.tls = opt_str(ca_file, "ca_file")?.map(|f| TlsOptions { ca_file: Some(f.into()) });
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The client

/// Called with every connection status change.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct hubmsg_status_callback {
    /// Passed to `call` and `drop`; owned by hubmsg once registered.
    pub context: *mut c_void,
    /// Called on the client's callback thread with a HUBMSG_STATUS_* value, the error for
    /// HUBMSG_STATUS_FAILED (else HUBMSG_OK) and a reason (never NULL, valid during the call).
    pub call: Option<unsafe extern "C-unwind" fn(context: *mut c_void, status: i32, error: hubmsg_result, reason: *const c_char)>,
    /// Called once with `context` when the callback is released (may be NULL).
    pub drop: Option<unsafe extern "C-unwind" fn(context: *mut c_void)>,
}

/// Called with each cloud-to-device message.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct hubmsg_c2d_callback {
    /// Passed to `call` and `drop`; owned by hubmsg once registered.
    pub context: *mut c_void,
    /// Called on the client's callback thread with a message that is valid only during the
    /// call. Settle it during the call with hubmsg_c2d_complete(), hubmsg_c2d_abandon() or
    /// hubmsg_c2d_reject(); one left unsettled is abandoned (delivered again). Do not free it.
    pub call: Option<unsafe extern "C-unwind" fn(context: *mut c_void, message: *mut hubmsg_c2d)>,
    /// Called once with `context` when the callback is released (may be NULL).
    pub drop: Option<unsafe extern "C-unwind" fn(context: *mut c_void)>,
}

/// Called once with the outcome of one sent message.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct hubmsg_outcome_callback {
    /// Passed to `call` and `drop`; owned by hubmsg once the send succeeded.
    pub context: *mut c_void,
    /// Called on the client's callback thread with a HUBMSG_OUTCOME_* value and the message id
    /// (valid during the call). Not called if the client is freed first.
    pub call: Option<unsafe extern "C-unwind" fn(context: *mut c_void, outcome: i32, message_id: *const c_char)>,
    /// Called once with `context` after `call`, or when the outcome will never be reported
    /// (may be NULL).
    pub drop: Option<unsafe extern "C-unwind" fn(context: *mut c_void)>,
}

type StatusFn = unsafe extern "C-unwind" fn(*mut c_void, i32, hubmsg_result, *const c_char);
type C2dFn = unsafe extern "C-unwind" fn(*mut c_void, *mut hubmsg_c2d);
type OutcomeFn = unsafe extern "C-unwind" fn(*mut c_void, i32, *const c_char);

/// A device client. Thread-safe: any thread may send, flush, receive or read stats concurrently.
/// Its callbacks (status, C2D, per-message outcomes) run on the client's own callback thread, one
/// at a time and never on a runtime thread; they may call any hubmsg function, including
/// hubmsg_device_free() on this client.
#[allow(non_camel_case_types)]
pub struct hubmsg_device {
    client: DeviceClient,
    c2d: Inbox<C2dSource>,
    dispatcher: Arc<Dispatcher>,
    status_task: Mutex<Option<JoinHandle<()>>>,
    outcomes: Arc<Tracker>,
    rt: Rt,
}

impl hubmsg_device {
    /// Closes the client; on return no callback runs any more and, unless called on the
    /// callback thread, every callback reference is gone (so every `drop` ran).
    fn close(self) {
        let hubmsg_device { client, c2d, dispatcher, status_task, outcomes, rt } = self;
        dispatcher.close();
        c2d.stop(&rt);
        if let Some(t) = status_task.lock().take() {
            t.abort();
            let _ = rt.block_on(t);
        }
        if let Err(e) = rt.block_on(client.close()) {
            tracing::warn!(error = %e, "closing the device client failed");
        }
        // Releasing the outbox ends every outcome task still waiting (with HUBMSG_CLOSED).
        drop((client, c2d));
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), outcomes.idle()).await }).ok();
        dispatcher.shutdown();
    }
}

/// Counts running tasks that hold user callbacks, so that closing can wait for them.
#[derive(Default)]
struct Tracker {
    running: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Held by a tracked task; its drop counts the task out.
struct Tracked(Arc<Tracker>);

impl Tracker {
    fn track(self: &Arc<Self>) -> Tracked {
        self.running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Tracked(self.clone())
    }

    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.running.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

unsafe fn device<'a>(dev: *mut hubmsg_device) -> Result<&'a hubmsg_device> {
    // SAFETY: the C API contract for `dev`.
    unsafe { arg_ref(dev, "dev") }
}

fn connect(opts: DeviceOptions) -> Result<hubmsg_device> {
    let rt = runtime()?;
    let client = block_on(&rt, "hubmsg_device_new", DeviceClient::connect(opts))??;
    let c = client.clone();
    Ok(hubmsg_device {
        client,
        c2d: Inbox::lazy("C2D messages", move || Ok(C2dSource(c.c2d()?))),
        dispatcher: Dispatcher::new("hubmsg-device-cb"),
        status_task: Mutex::new(None),
        outcomes: Arc::default(),
        rt,
    })
}

/// Creates a device client: opens (and recovers) the outbox and starts connecting in the
/// background; returns without waiting for the connection.
///
/// @param opts The options (not consumed; free them when convenient).
/// @param out Receives the client (NULL on failure); free with hubmsg_device_free().
/// @return HUBMSG_OK, HUBMSG_INVALID_ARGUMENT (no key or token, bad host name or device id),
///         HUBMSG_STORAGE (outbox directory), or HUBMSG_USAGE (called on a runtime thread).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_new(opts: *const hubmsg_device_options, out: *mut *mut hubmsg_device) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (out, o) = unsafe { (Out::new(out, "out")?, arg_ref(opts, "opts")?) };
        if !o.has_credential {
            return Err(Error::invalid("the device options have no credential; call hubmsg_device_options_set_key or _set_sas_token"));
        }
        out.put(connect(o.opts.clone())?);
        Ok(HUBMSG_OK)
    })
}

/// Creates a device client from a connection string with default options (a durable outbox in
/// the default directory of the hub and device id; see hubmsg_device_options_set_outbox_dir()).
///
/// @param connection_string A device connection string.
/// @param out Receives the client (NULL on failure); free with hubmsg_device_free().
/// @return HUBMSG_OK, HUBMSG_INVALID_ARGUMENT, or HUBMSG_USAGE (called on a runtime thread).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_new_from_connection_string(
    connection_string: *const c_char,
    out: *mut *mut hubmsg_device,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (out, cs) = unsafe { (Out::new(out, "out")?, arg_str(connection_string, "connection_string")?) };
        out.put(connect(DeviceOptions::from_connection_string(cs)?)?);
        Ok(HUBMSG_OK)
    })
}

/// Closes the client and frees it. NULL is a no-op. Waits up to 10 s for messages in flight to
/// be acknowledged; undelivered messages stay in the outbox directory for the next start.
/// Callbacks are not called any more once this starts; from another thread it returns after
/// every callback `drop` ran. Safe to call from inside the client's own callback (the remaining
/// drops then run right after that callback returns).
///
/// @param dev The client, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_free(dev: *mut hubmsg_device) {
    guard_or((), || {
        // SAFETY: the C API contract for `dev`.
        if let Some(d) = unsafe { free_box(dev) } {
            dispose(move || (*d).close());
        }
        Ok(())
    })
}

/// The outcome of one sent message, to wait for. Thread-safe; free with hubmsg_delivery_free().
#[allow(non_camel_case_types)]
pub struct hubmsg_delivery {
    slot: Arc<Slot>,
    message_id: CString,
}

#[derive(Default)]
struct Slot {
    value: StdMutex<Option<Result<Outcome>>>,
    ready: Condvar,
}

impl Slot {
    fn set(&self, v: Result<Outcome>) {
        let mut g = self.value.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(v);
            self.ready.notify_all();
        }
    }
}

/// Fills the slot with `Closed` if the outcome task is dropped before an outcome.
struct SlotGuard(Arc<Slot>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0
            .set(Err(Error::new(ErrorKind::Closed, "the client was freed before the message reached an outcome; it stays in the outbox")));
    }
}

/// Queues a message for delivery; returns once it is durable in the outbox (per the durability
/// setting). Sets the message id (a UUID) and creation time when absent; `msg` itself is not
/// changed and stays owned by the caller.
///
/// @param dev The client.
/// @param msg The message.
/// @param on_outcome Optional (may be NULL): called once with the message's outcome; on failure
///        of this call the callback is not taken (its `drop` is not called).
/// @param out_delivery Optional (may be NULL): receives a handle to wait for the outcome with
///        hubmsg_delivery_wait() (NULL on failure).
/// @return HUBMSG_OK, HUBMSG_QUEUE_FULL (outbox full, policy reject), HUBMSG_MESSAGE_TOO_LARGE,
///         HUBMSG_INVALID_ARGUMENT, HUBMSG_STORAGE, HUBMSG_CLOSED, or HUBMSG_USAGE (runtime
///         thread).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_send(
    dev: *mut hubmsg_device,
    msg: *const hubmsg_message,
    on_outcome: *const hubmsg_outcome_callback,
    out_delivery: *mut *mut hubmsg_delivery,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for every pointer.
        let (out, d, m, cb) = unsafe { (Out::optional(out_delivery), device(dev)?, arg_ref(msg, "msg")?, on_outcome.as_ref()) };
        ensure_may_block("hubmsg_device_send")?;
        let cb = match cb {
            Some(cb) => {
                d.dispatcher.start()?;
                Some((cb.context, cb.call, cb.drop))
            }
            None => None,
        };
        if let Some((_, None, _)) = cb {
            return Err(Error::invalid("on_outcome.call is NULL"));
        }
        let delivery = d.client.send_blocking(m.msg.clone())?;
        if cb.is_none() && out.is_none() {
            return Ok(HUBMSG_OK);
        }
        let cb = cb.map(|(ctx, call, drop)| Closure::<OutcomeFn>::new("outcome callback", ctx, call, drop)).transpose()?;
        let slot = Arc::new(Slot::default());
        let id = to_cstring(&delivery.message_id);
        if let Some(out) = out {
            out.put(hubmsg_delivery { slot: slot.clone(), message_id: id.clone() });
        }
        let dispatcher = d.dispatcher.clone();
        let tracked = d.outcomes.track();
        d.rt.spawn(async move {
            let _tracked = tracked;
            let guard = SlotGuard(slot);
            let r = delivery.outcome().await;
            if let (Ok(o), Some(cb)) = (&r, cb) {
                let code = outcome_code(*o);
                // SAFETY: the user's callback with its own context and a string valid during the call.
                dispatcher.post(move || cb.invoke(|f: OutcomeFn, ctx| unsafe { f(ctx, code, id.as_ptr()) }));
            }
            guard.0.set(r);
        });
        Ok(HUBMSG_OK)
    })
}

/// Waits for the outcome of a sent message.
///
/// @param delivery The handle from hubmsg_device_send().
/// @param timeout_ms How long to wait (0 = just look).
/// @param out_outcome Receives a HUBMSG_OUTCOME_* value on HUBMSG_OK (untouched otherwise).
/// @return HUBMSG_OK, HUBMSG_PENDING (no outcome yet; wait again), HUBMSG_CLOSED (the client was
///         freed first; the message stays in the outbox), HUBMSG_INVALID_ARGUMENT, or
///         HUBMSG_USAGE (a wait with timeout on a runtime thread).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_delivery_wait(delivery: *mut hubmsg_delivery, timeout_ms: u32, out_outcome: *mut i32) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let d = unsafe { arg_ref(delivery, "delivery") }?;
        if out_outcome.is_null() {
            return Err(crate::args::null("out_outcome"));
        }
        if timeout_ms > 0 {
            ensure_may_block("hubmsg_delivery_wait")?;
        }
        let g = d.slot.value.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = d.slot.ready.wait_timeout_while(g, ms(timeout_ms), |v| v.is_none()).unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            None => Ok(HUBMSG_PENDING),
            Some(Err(e)) => Err(e.clone()),
            Some(Ok(o)) => {
                // SAFETY: checked non-NULL; writable per the C API contract.
                unsafe { *out_outcome = outcome_code(*o) };
                Ok(HUBMSG_OK)
            }
        }
    })
}

/// The message id of a sent message (the one given, or the generated UUID).
///
/// @param delivery The handle.
/// @return A string valid while the handle lives, or NULL when `delivery` is NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_delivery_message_id(delivery: *const hubmsg_delivery) -> *const c_char {
    // SAFETY: the C API contract for `delivery`.
    guard_or(std::ptr::null(), || Ok(unsafe { arg_ref(delivery, "delivery") }?.message_id.as_ptr()))
}

/// Frees a delivery handle (the message itself is unaffected). NULL is a no-op.
///
/// @param delivery The handle, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_delivery_free(delivery: *mut hubmsg_delivery) {
    // SAFETY: the C API contract for `delivery`.
    unsafe { free_handle(delivery) }
}

/// Waits until every queued message reached an outcome and every outcome callback of those
/// messages has returned (called from inside a callback, the callbacks still queued behind it
/// run after it returns).
///
/// @param dev The client.
/// @param timeout_ms The limit.
/// @return HUBMSG_OK, HUBMSG_TIMEOUT (messages still pending, or their callbacks still running;
///         nothing is lost, delivery goes on), HUBMSG_INVALID_ARGUMENT, or HUBMSG_USAGE (runtime
///         thread).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_flush(dev: *mut hubmsg_device, timeout_ms: u32) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `dev`.
        let d = unsafe { device(dev) }?;
        let deadline = Instant::now() + ms(timeout_ms);
        block_on(&d.rt, "hubmsg_device_flush", async {
            d.client.flush(ms(timeout_ms)).await?;
            // Every message has its outcome: the tasks that post their callbacks end promptly.
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::timeout(left, d.outcomes.idle()).await.map_err(|_| callbacks_pending())
        })??;
        if !d.dispatcher.barrier(deadline.saturating_duration_since(Instant::now())) {
            return Err(callbacks_pending());
        }
        Ok(HUBMSG_OK)
    })
}

fn callbacks_pending() -> Error {
    Error::new(ErrorKind::Timeout, "flush: every message reached its outcome, but outcome callbacks are still running")
}

/// The current connection status.
///
/// @param dev The client.
/// @param out_status Receives a HUBMSG_STATUS_* value.
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_status(dev: *mut hubmsg_device, out_status: *mut i32) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `dev`.
        let d = unsafe { device(dev) }?;
        if out_status.is_null() {
            return Err(crate::args::null("out_status"));
        }
        // SAFETY: checked non-NULL; writable per the C API contract.
        unsafe { *out_status = status_parts(&d.client.status()).0 };
        Ok(HUBMSG_OK)
    })
}

/// Registers the connection-status callback (once per client). It is called right away with the
/// current status, then with every change (rapid changes may be coalesced).
///
/// @param dev The client.
/// @param callback The callback (copied; hubmsg owns its context from now on).
/// @return HUBMSG_OK, HUBMSG_INVALID_ARGUMENT (NULL or `call` NULL), or HUBMSG_USAGE (already
///         registered).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_on_status(dev: *mut hubmsg_device, callback: *const hubmsg_status_callback) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (d, cb) = unsafe { (device(dev)?, arg_ref(callback, "callback")?) };
        let mut task = d.status_task.lock();
        if task.is_some() {
            return Err(Error::new(ErrorKind::Usage, "a status callback is already registered on this client"));
        }
        let cb = Closure::<StatusFn>::new("status callback", cb.context, cb.call, cb.drop)?;
        d.dispatcher.start()?;
        let dispatcher = d.dispatcher.clone();
        let mut watch = d.client.status_watch();
        *task = Some(d.rt.spawn(async move {
            loop {
                let (status, error, reason) = status_parts(&watch.borrow_and_update());
                let cb = cb.clone();
                let reason = to_cstring(&reason);
                // SAFETY: the user's callback with its own context and a string valid during the call.
                dispatcher.post(move || cb.invoke(|f: StatusFn, ctx| unsafe { f(ctx, status, error, reason.as_ptr()) }));
                if watch.changed().await.is_err() {
                    break;
                }
            }
        }));
        Ok(HUBMSG_OK)
    })
}

/// Asks a client in HUBMSG_STATUS_FAILED to try connecting again (e.g. after the device was
/// re-enabled). Harmless in any other state.
///
/// @param dev The client.
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_reconnect(dev: *mut hubmsg_device) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `dev`.
        unsafe { device(dev) }?.client.reconnect();
        Ok(HUBMSG_OK)
    })
}

/// Client counters.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct hubmsg_device_stats {
    /// Messages in the outbox (queued + in flight).
    pub depth: u64,
    /// Bytes in the outbox.
    pub bytes: u64,
    /// Messages sent and not yet acknowledged.
    pub in_flight: u64,
    /// Messages acknowledged by the hub since the client started.
    pub delivered: u64,
    /// Messages removed by the drop_oldest policy since start.
    pub dropped: u64,
    /// Messages that expired before sending since start.
    pub expired: u64,
    /// Messages the receiver refused since start.
    pub rejected: u64,
    /// Messages recovered from the outbox directory at start.
    pub recovered: u64,
    /// Successful connects since start.
    pub connects: u64,
    /// Failed connection attempts and drops that led to a retry.
    pub retries: u64,
    /// C2D messages handed to the application.
    pub c2d_received: u64,
    /// C2D redeliveries kept from the application: of messages it already completed (completed
    /// again without it) or still holds unsettled (its settle applies to the redelivery).
    pub c2d_duplicates: u64,
    /// C2D messages that arrived expired (not handed to the application).
    pub c2d_expired: u64,
    /// SAS token renewals.
    pub renewals: u64,
    /// The last connection error (NUL-terminated, cut to fit; empty if none).
    pub last_error: [c_char; 256],
}

impl From<&DeviceStats> for hubmsg_device_stats {
    fn from(s: &DeviceStats) -> hubmsg_device_stats {
        let mut last_error = [0 as c_char; 256];
        let text = s.last_error.as_deref().unwrap_or("");
        let mut n = text.len().min(last_error.len() - 1);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        for (dst, b) in last_error.iter_mut().zip(&text.as_bytes()[..n]) {
            *dst = *b as c_char;
        }
        let o = &s.outbox;
        hubmsg_device_stats {
            depth: o.depth as u64,
            bytes: o.bytes as u64,
            in_flight: o.in_flight as u64,
            delivered: o.delivered,
            dropped: o.dropped,
            expired: o.expired,
            rejected: o.rejected,
            recovered: o.recovered,
            connects: s.connects,
            retries: s.retries,
            c2d_received: s.c2d_received,
            c2d_duplicates: s.c2d_duplicates,
            c2d_expired: s.c2d_expired,
            renewals: s.renewals,
            last_error,
        }
    }
}

/// Reads the client's counters.
///
/// @param dev The client.
/// @param out Receives the counters.
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_get_stats(dev: *mut hubmsg_device, out: *mut hubmsg_device_stats) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `dev`.
        let d = unsafe { device(dev) }?;
        if out.is_null() {
            return Err(crate::args::null("out"));
        }
        // SAFETY: checked non-NULL; writable per the C API contract.
        unsafe { out.write((&d.client.stats()).into()) };
        Ok(HUBMSG_OK)
    })
}

// ---------------------------------------------------------------------------------------------
// C2D

/// A received cloud-to-device message with its settlement. Not thread-safe (one thread at a
/// time); one lent to a callback is valid only during the call.
#[allow(non_camel_case_types)]
pub struct hubmsg_c2d {
    message: hubmsg_message,
    sequence_number: u64,
    settle: Option<C2dMessage>,
}

impl hubmsg_c2d {
    fn new(m: C2dMessage) -> hubmsg_c2d {
        hubmsg_c2d { message: hubmsg_message::new(m.message.clone()), sequence_number: m.sequence_number, settle: Some(m) }
    }
}

/// Waits up to `timeout_ms` for the next C2D message (pull mode). The first call subscribes to
/// C2D; a client uses either this or hubmsg_device_on_c2d(), not both.
///
/// @param dev The client.
/// @param timeout_ms How long to wait.
/// @param out Receives the message (NULL on failure or timeout); settle it, then free it with
///        hubmsg_c2d_free().
/// @return HUBMSG_OK, HUBMSG_EMPTY (timeout), HUBMSG_CLOSED, HUBMSG_INVALID_ARGUMENT, or
///         HUBMSG_USAGE (a callback is registered, or runtime thread).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_recv(dev: *mut hubmsg_device, timeout_ms: u32, out: *mut *mut hubmsg_c2d) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (out, d) = unsafe { (Out::new(out, "out")?, device(dev)?) };
        crate::args::recv_into(&d.c2d, &d.rt, timeout_ms, out, hubmsg_c2d::new)
    })
}

/// Receives C2D messages by callback (subscribes now). A client uses either this or
/// hubmsg_device_recv(), not both.
///
/// @param dev The client.
/// @param callback The callback (copied; hubmsg owns its context from now on).
/// @return HUBMSG_OK, HUBMSG_INVALID_ARGUMENT, or HUBMSG_USAGE (already receiving).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_on_c2d(dev: *mut hubmsg_device, callback: *const hubmsg_c2d_callback) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (d, cb) = unsafe { (device(dev)?, arg_ref(callback, "callback")?) };
        let cb = Closure::<C2dFn>::new("C2D callback", cb.context, cb.call, cb.drop)?;
        d.c2d.set_callback(&d.rt, &d.dispatcher, move |m| {
            // SAFETY: the user's callback with its own context; the message lives during the call.
            let mut c2d = cb.lend(hubmsg_c2d::new(m), |f: C2dFn, ctx, p| unsafe { f(ctx, p) });
            if let Some(m) = c2d.settle.take() {
                let _ = if m.sequence_number > 0 { m.abandon() } else { Ok(()) };
            }
        })?;
        Ok(HUBMSG_OK)
    })
}

/// The message's content (valid while `c2d` lives; copy with hubmsg_message_clone()).
///
/// @param c2d The C2D message.
/// @return The message, or NULL when `c2d` is NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_c2d_message(c2d: *const hubmsg_c2d) -> *const hubmsg_message {
    // SAFETY: the C API contract for `c2d`.
    guard_or(std::ptr::null(), || Ok(&unsafe { arg_ref(c2d, "c2d") }?.message as *const hubmsg_message))
}

/// The message's sequence number in the device queue (0 when the hub does not send one, e.g.
/// Azure IoT Hub; such messages can only be completed).
///
/// @param c2d The C2D message.
/// @return The sequence number, or 0.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_c2d_sequence_number(c2d: *const hubmsg_c2d) -> u64 {
    // SAFETY: the C API contract for `c2d`.
    guard_or(0, || Ok(unsafe { arg_ref(c2d, "c2d") }?.sequence_number))
}

unsafe fn settle(c2d: *mut hubmsg_c2d, how: fn(C2dMessage) -> Result<()>) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `c2d`.
        let c = unsafe { arg_mut(c2d, "c2d") }?;
        let m = c.settle.take().ok_or_else(|| Error::new(ErrorKind::Usage, "this C2D message was already settled"))?;
        how(m)?;
        Ok(HUBMSG_OK)
    })
}

/// Completes the message: the hub removes it (feedback Success if requested). Its id is recorded
/// durably first, so a redelivery never reaches the application again.
///
/// @param c2d The C2D message.
/// @return HUBMSG_OK, HUBMSG_USAGE (already settled), HUBMSG_CLOSED, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_c2d_complete(c2d: *mut hubmsg_c2d) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe { settle(c2d, C2dMessage::complete) }
}

/// Abandons the message: it goes back to the queue (delivery count + 1; dead-lettered with
/// feedback DeliveryCountExceeded at the maximum).
///
/// @param c2d The C2D message.
/// @return HUBMSG_OK, HUBMSG_USAGE (already settled, or a hub without abandon), HUBMSG_CLOSED,
///         or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_c2d_abandon(c2d: *mut hubmsg_c2d) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe { settle(c2d, C2dMessage::abandon) }
}

/// Rejects the message: it is dead-lettered (feedback Rejected if requested).
///
/// @param c2d The C2D message.
/// @return HUBMSG_OK, HUBMSG_USAGE (already settled, or a hub without reject), HUBMSG_CLOSED,
///         or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_c2d_reject(c2d: *mut hubmsg_c2d) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe { settle(c2d, C2dMessage::reject) }
}

/// Frees a message from hubmsg_device_recv(). NULL is a no-op. An unsettled message stays
/// locked at the hub until its lock times out, then is delivered again. Never free a message
/// borrowed by a callback.
///
/// @param c2d The C2D message, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_c2d_free(c2d: *mut hubmsg_c2d) {
    // SAFETY: the C API contract for `c2d`.
    unsafe { free_handle(c2d) }
}
