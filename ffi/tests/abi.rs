//! The C ABI called from Rust: the frozen result-code table, the panic boundary around user
//! callbacks, and the refusal of blocking calls on a runtime thread.

use std::ffi::{c_char, c_void, CStr};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hubmsg::*;

fn last_error() -> String {
    // SAFETY: hubmsg_last_error_message never returns NULL.
    unsafe { CStr::from_ptr(hubmsg_last_error_message()) }.to_string_lossy().into_owned()
}

fn name(code: hubmsg_result) -> String {
    // SAFETY: hubmsg_result_str never returns NULL.
    unsafe { CStr::from_ptr(hubmsg_result_str(code)) }.to_string_lossy().into_owned()
}

/// Codes are part of the ABI: this copy must never change (append new ones only).
#[test]
fn result_codes_are_frozen() {
    let frozen = [
        (HUBMSG_OK, 0, "HUBMSG_OK"),
        (HUBMSG_EMPTY, 1, "HUBMSG_EMPTY"),
        (HUBMSG_PENDING, 2, "HUBMSG_PENDING"),
        (HUBMSG_INVALID_ARGUMENT, -1, "HUBMSG_INVALID_ARGUMENT"),
        (HUBMSG_UNAUTHORIZED, -2, "HUBMSG_UNAUTHORIZED"),
        (HUBMSG_NOT_FOUND, -3, "HUBMSG_NOT_FOUND"),
        (HUBMSG_ALREADY_EXISTS, -4, "HUBMSG_ALREADY_EXISTS"),
        (HUBMSG_QUEUE_FULL, -5, "HUBMSG_QUEUE_FULL"),
        (HUBMSG_MESSAGE_TOO_LARGE, -6, "HUBMSG_MESSAGE_TOO_LARGE"),
        (HUBMSG_TIMEOUT, -7, "HUBMSG_TIMEOUT"),
        (HUBMSG_DISCONNECTED, -8, "HUBMSG_DISCONNECTED"),
        (HUBMSG_STORAGE, -9, "HUBMSG_STORAGE"),
        (HUBMSG_PROTOCOL, -10, "HUBMSG_PROTOCOL"),
        (HUBMSG_CLOSED, -11, "HUBMSG_CLOSED"),
        (HUBMSG_EXPIRED, -12, "HUBMSG_EXPIRED"),
        (HUBMSG_LOCK_LOST, -13, "HUBMSG_LOCK_LOST"),
        (HUBMSG_USAGE, -14, "HUBMSG_USAGE"),
        (HUBMSG_INTERNAL, -15, "HUBMSG_INTERNAL"),
    ];
    for (constant, value, expected) in frozen {
        assert_eq!(constant, value, "{expected} was renumbered");
        assert_eq!(name(constant), expected);
    }
    assert_eq!(name(3), "HUBMSG_UNKNOWN");
    assert_eq!(name(-16), "HUBMSG_UNKNOWN");
}

#[test]
fn core_error_kinds_map_through_the_one_table() {
    // A core error surfaces with its kind's code and message: a malformed connection string is
    // InvalidArgument; a device id with '/' too.
    let mut opts = null_mut();
    // SAFETY: valid C strings and out-pointer.
    let rc = unsafe { hubmsg_device_options_from_connection_string(c"HostName=x".as_ptr(), &mut opts) };
    assert_eq!(rc, HUBMSG_INVALID_ARGUMENT);
    assert!(opts.is_null());
    assert!(last_error().starts_with("INVALID_ARGUMENT: "), "{}", last_error());
}

/// A device pointed at a closed port, in memory, never retrying: enough for API checks.
fn offline_device() -> *mut hubmsg_device {
    let mut o = null_mut();
    let mut d = null_mut();
    // SAFETY: valid arguments; the options are freed after use.
    unsafe {
        assert_eq!(hubmsg_device_options_new(c"127.0.0.1:1".as_ptr(), c"abi".as_ptr(), &mut o), HUBMSG_OK);
        assert_eq!(hubmsg_device_options_set_key(o, c"a2V5a2V5a2V5".as_ptr()), HUBMSG_OK);
        assert_eq!(hubmsg_device_options_set_retry(o, 10, 50, 2.0, 5, HUBMSG_FOREVER), HUBMSG_OK);
        assert_eq!(hubmsg_device_options_set_outbox_in_memory(o, 1), HUBMSG_OK);
        assert_eq!(hubmsg_device_new(o, &mut d), HUBMSG_OK, "{}", last_error());
        hubmsg_device_options_free(o);
    }
    d
}

#[test]
fn blocking_calls_on_a_runtime_thread_are_refused() {
    let d = offline_device();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (flush, recv, new) = rt.block_on(async {
        let mut c = null_mut();
        let mut d2 = null_mut();
        // SAFETY: valid handles and out-pointers.
        unsafe {
            (
                hubmsg_device_flush(d, 10),
                hubmsg_device_recv(d, 10, &mut c),
                hubmsg_device_new_from_connection_string(c"HostName=127.0.0.1:1;DeviceId=x;SharedAccessKey=a2V5".as_ptr(), &mut d2),
            )
        }
    });
    assert_eq!(flush, HUBMSG_USAGE);
    assert_eq!(recv, HUBMSG_USAGE);
    assert_eq!(new, HUBMSG_USAGE);
    // Off the runtime the same calls work.
    let mut c = null_mut();
    // SAFETY: valid handle and out-pointer.
    assert_eq!(unsafe { hubmsg_device_recv(d, 10, &mut c) }, HUBMSG_EMPTY);
    // Freeing works from a runtime thread too (the teardown moves to another thread).
    rt.block_on(async {
        // SAFETY: `d` is a live handle, freed once.
        unsafe { hubmsg_device_free(d) }
    });
}

static STATUS_CALLS: AtomicUsize = AtomicUsize::new(0);
static STATUS_DROPS: AtomicUsize = AtomicUsize::new(0);

extern "C-unwind" fn panicking_status(_: *mut c_void, _: i32, _: hubmsg_result, _: *const c_char) {
    STATUS_CALLS.fetch_add(1, Ordering::SeqCst);
    panic!("a user callback panics");
}

extern "C-unwind" fn count_drop(_: *mut c_void) {
    STATUS_DROPS.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn a_panicking_callback_does_not_take_the_client_down() {
    let d = offline_device();
    let cb = hubmsg_status_callback { context: null_mut(), call: Some(panicking_status), drop: Some(count_drop) };
    // SAFETY: valid handle and callback.
    assert_eq!(unsafe { hubmsg_device_on_status(d, &cb) }, HUBMSG_OK);
    // The client keeps retrying, so the status changes again and again: the callback thread
    // survives each panic and keeps calling.
    let deadline = Instant::now() + Duration::from_secs(20);
    while STATUS_CALLS.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "status callback called only {} times", STATUS_CALLS.load(Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(5));
    }
    // And the client still works.
    let mut m = null_mut();
    let mut st = std::mem::MaybeUninit::<hubmsg_device_stats>::uninit();
    // SAFETY: valid handles and out-pointers.
    unsafe {
        assert_eq!(hubmsg_message_new(b"x".as_ptr(), 1, &mut m), HUBMSG_OK);
        assert_eq!(hubmsg_device_send(d, m, null(), null_mut()), HUBMSG_OK);
        assert_eq!(hubmsg_device_get_stats(d, st.as_mut_ptr()), HUBMSG_OK);
        assert_eq!(st.assume_init().depth, 1);
        hubmsg_message_free(m);
        hubmsg_device_free(d);
    }
    assert_eq!(STATUS_DROPS.load(Ordering::SeqCst), 1, "drop runs exactly once, by the time free returns");
}

static LOG_CALLS: AtomicUsize = AtomicUsize::new(0);

extern "C-unwind" fn panicking_log(_: *mut c_void, _: i32, _: *const c_char, _: *const c_char) {
    LOG_CALLS.fetch_add(1, Ordering::SeqCst);
    panic!("a log callback panics");
}

#[test]
fn a_panicking_log_callback_is_contained() {
    let cb = hubmsg_log_callback { context: null_mut(), call: Some(panicking_log), drop: None };
    // SAFETY: a valid callback struct.
    assert_eq!(unsafe { hubmsg_set_log_callback(&cb, HUBMSG_LOG_TRACE) }, HUBMSG_OK);
    tracing::warn!("an event for the callback");
    tracing::info!("and another");
    assert!(LOG_CALLS.load(Ordering::SeqCst) >= 2);
    // SAFETY: NULL removes the callback.
    assert_eq!(unsafe { hubmsg_set_log_callback(null(), HUBMSG_LOG_OFF) }, HUBMSG_OK);
    let before = LOG_CALLS.load(Ordering::SeqCst);
    tracing::warn!("not delivered");
    assert_eq!(LOG_CALLS.load(Ordering::SeqCst), before);
}

static OUTCOMES: AtomicUsize = AtomicUsize::new(0);

extern "C-unwind" fn slow_outcome(_: *mut c_void, outcome: i32, _: *const c_char) {
    // A callback that takes its time keeps the callback thread's queue behind the outbox.
    std::thread::sleep(Duration::from_millis(1));
    if outcome == HUBMSG_OUTCOME_DELIVERED {
        OUTCOMES.fetch_add(1, Ordering::SeqCst);
    }
}

/// `hubmsg_device_flush` returning means every flushed message's outcome callback has run,
/// even when the callbacks are slower than the hub's acknowledgements (before the fix, flush
/// returned once the outbox was empty and free then dropped the callbacks still queued:
/// examples/c/send_telemetry counted 116 of 200).
#[test]
fn flush_returns_after_every_outcome_callback_ran() {
    const N: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let data = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
    let (mut hub, mut cs, mut o, mut d) = (null_mut(), null_mut(), null_mut(), null_mut());
    // SAFETY: valid arguments and out-pointers; every handle is freed once below.
    unsafe {
        assert_eq!(hubmsg_hub_start(data.as_ptr(), c"127.0.0.1:0".as_ptr(), &mut hub), HUBMSG_OK, "{}", last_error());
        assert_eq!(hubmsg_hub_create_device(hub, c"flusher".as_ptr(), &mut cs), HUBMSG_OK, "{}", last_error());
        assert_eq!(hubmsg_device_options_from_connection_string(cs, &mut o), HUBMSG_OK, "{}", last_error());
        assert_eq!(hubmsg_device_options_set_outbox_in_memory(o, 1), HUBMSG_OK);
        assert_eq!(hubmsg_device_new(o, &mut d), HUBMSG_OK, "{}", last_error());
        hubmsg_device_options_free(o);
        hubmsg_string_free(cs);
        let cb = hubmsg_outcome_callback { context: null_mut(), call: Some(slow_outcome), drop: None };
        for _ in 0..N {
            let mut m = null_mut();
            assert_eq!(hubmsg_message_new(b"reading".as_ptr(), 7, &mut m), HUBMSG_OK);
            assert_eq!(hubmsg_device_send(d, m, &cb, null_mut()), HUBMSG_OK, "{}", last_error());
            hubmsg_message_free(m);
        }
        assert_eq!(hubmsg_device_flush(d, 60_000), HUBMSG_OK, "{}", last_error());
        assert_eq!(OUTCOMES.load(Ordering::SeqCst), N, "flush returned before every outcome callback ran");
        hubmsg_device_free(d);
        hubmsg_hub_free(hub);
    }
}
