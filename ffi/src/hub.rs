//! The embedded hub: a full hubmsg hub inside the calling process (for tests, demos and edge
//! gateways). Built with the `hub` feature (default); without it these functions exist but
//! hubmsg_hub_start() returns HUBMSG_USAGE, so the header and ABI are the same in both builds.
//!
//! `hubmsg_hub` is thread-safe and has no callbacks; it runs on the shared runtime.
#![cfg_attr(not(feature = "hub"), allow(dead_code, unused_mut))]

use std::ffi::{c_char, CString};
use std::path::PathBuf;

#[cfg(feature = "hub")]
use hubmsg_core::ErrorKind;
use hubmsg_core::{store::Durability, Error, Result};

use crate::args::{arg_mut, arg_ref, arg_str, free_box, free_handle, ms, Out};
use crate::result::{guard, guard_or, hubmsg_result, HUBMSG_OK};
use hubmsg_bind::{dispose, Rt};

/// Embedded hub settings. Not thread-safe (one thread at a time).
#[allow(non_camel_case_types)]
pub struct hubmsg_hub_options {
    data_dir: PathBuf,
    listen: std::net::SocketAddr,
    feedback_interval: Option<std::time::Duration>,
    durability: Option<Durability>,
}

/// Creates hub settings: data in `data_dir`, a plain MQTT listener on 127.0.0.1 port 0 (a free
/// port), feedback batched every 15 s, durability always.
///
/// @param data_dir Where the hub keeps everything (created if missing).
/// @param out Receives the options (NULL on failure); free with hubmsg_hub_options_free().
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_options_new(data_dir: *const c_char, out: *mut *mut hubmsg_hub_options) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (out, dir) = unsafe { (Out::new(out, "out")?, arg_str(data_dir, "data_dir")?) };
        out.put(hubmsg_hub_options { data_dir: dir.into(), listen: ([127, 0, 0, 1], 0).into(), feedback_interval: None, durability: None });
        Ok(HUBMSG_OK)
    })
}

/// Frees hub options. NULL is a no-op.
///
/// @param opts The options, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_options_free(opts: *mut hubmsg_hub_options) {
    // SAFETY: the C API contract for `opts`.
    unsafe { free_handle(opts) }
}

fn parse_listen(addr: &str) -> Result<std::net::SocketAddr> {
    addr.parse().map_err(|_| Error::invalid(format!("listen address '{addr}' is not ip:port (e.g. 127.0.0.1:0)")))
}

/// Sets the plain MQTT listen address.
///
/// @param opts The options.
/// @param listen_addr `ip:port`, e.g. `127.0.0.1:0` (port 0 picks a free port; read it back with
///        hubmsg_hub_address()).
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_options_set_listen(opts: *mut hubmsg_hub_options, listen_addr: *const c_char) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (o, addr) = unsafe { (arg_mut(opts, "opts")?, arg_str(listen_addr, "listen_addr")?) };
        o.listen = parse_listen(addr)?;
        Ok(HUBMSG_OK)
    })
}

/// Sets how long a C2D feedback record may wait before its batch is sent (IoT Hub: 15 s; lower
/// it for tests).
///
/// @param opts The options.
/// @param interval_ms The interval (> 0).
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_options_set_feedback_interval(opts: *mut hubmsg_hub_options, interval_ms: u32) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `opts`.
        let o = unsafe { arg_mut(opts, "opts") }?;
        if interval_ms == 0 {
            return Err(Error::invalid("feedback interval must be > 0 ms"));
        }
        o.feedback_interval = Some(ms(interval_ms));
        Ok(HUBMSG_OK)
    })
}

/// Sets the durability of every hub store.
///
/// @param opts The options.
/// @param mode HUBMSG_DURABILITY_ALWAYS, HUBMSG_DURABILITY_INTERVAL or HUBMSG_DURABILITY_NEVER.
/// @param interval_ms The fdatasync interval for HUBMSG_DURABILITY_INTERVAL (> 0).
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_options_set_durability(opts: *mut hubmsg_hub_options, mode: i32, interval_ms: u32) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `opts`.
        let o = unsafe { arg_mut(opts, "opts") }?;
        o.durability = Some(crate::device::durability_arg(mode, interval_ms)?);
        Ok(HUBMSG_OK)
    })
}

/// A running embedded hub. Thread-safe; it has no callbacks (it runs on the shared runtime).
/// Freeing it shuts it down.
#[allow(non_camel_case_types)]
pub struct hubmsg_hub {
    #[cfg(feature = "hub")]
    hub: Option<hubmsg_core::hub::Hub>,
    address: CString,
    service_cs: CString,
    rt: Rt,
}

#[cfg(feature = "hub")]
fn start(o: &hubmsg_hub_options) -> Result<hubmsg_hub> {
    let mut cfg = hubmsg_core::hub::HubConfig::new(&o.data_dir);
    cfg.mqtt = Some(o.listen);
    cfg.host_name = o.listen.ip().to_string();
    if let Some(f) = o.feedback_interval {
        cfg.feedback_interval = f;
    }
    if let Some(d) = o.durability {
        cfg.durability = d;
    }
    let rt = hubmsg_bind::runtime()?;
    let hub = hubmsg_bind::block_on(&rt, "hubmsg_hub_start", hubmsg_core::hub::Hub::start(cfg))??;
    let address = hub.mqtt_addr().map(|a| a.to_string()).ok_or_else(|| Error::new(ErrorKind::Internal, "the hub has no plain listener"))?;
    Ok(hubmsg_hub {
        address: crate::result::to_cstring(&address),
        service_cs: crate::result::to_cstring(&hub.service_connection_string()),
        hub: Some(hub),
        rt,
    })
}

#[cfg(not(feature = "hub"))]
fn start(_: &hubmsg_hub_options) -> Result<hubmsg_hub> {
    Err(Error::new(hubmsg_core::ErrorKind::Usage, "this libhubmsg was built without the embedded hub (cargo feature `hub`)"))
}

/// Starts a hub with hubmsg_hub_options_new() defaults in `data_dir`, listening on
/// `listen_addr`.
///
/// @param data_dir Where the hub keeps everything (created if missing; reopened if it exists).
/// @param listen_addr `ip:port` (e.g. `127.0.0.1:0`), or NULL for `127.0.0.1:0`.
/// @param out Receives the hub (NULL on failure); free with hubmsg_hub_free().
/// @return HUBMSG_OK, HUBMSG_INVALID_ARGUMENT (bad address, port in use), HUBMSG_STORAGE, or
///         HUBMSG_USAGE (runtime thread, or built without the hub).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_start(data_dir: *const c_char, listen_addr: *const c_char, out: *mut *mut hubmsg_hub) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (out, dir, listen) =
            unsafe { (Out::new(out, "out")?, arg_str(data_dir, "data_dir")?, crate::args::opt_str(listen_addr, "listen_addr")?) };
        let listen = listen.map(parse_listen).transpose()?.unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
        out.put(start(&hubmsg_hub_options { data_dir: dir.into(), listen, feedback_interval: None, durability: None })?);
        Ok(HUBMSG_OK)
    })
}

/// Starts a hub with the given options.
///
/// @param opts The options (not consumed).
/// @param out Receives the hub (NULL on failure); free with hubmsg_hub_free().
/// @return As hubmsg_hub_start().
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_start_with(opts: *const hubmsg_hub_options, out: *mut *mut hubmsg_hub) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (out, o) = unsafe { (Out::new(out, "out")?, arg_ref(opts, "opts")?) };
        out.put(start(o)?);
        Ok(HUBMSG_OK)
    })
}

/// Shuts the hub down (closes every connection, persists checkpoints, closes the stores) and
/// frees it. NULL is a no-op.
///
/// @param hub The hub, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_free(hub: *mut hubmsg_hub) {
    guard_or((), || {
        // SAFETY: the C API contract for `hub`.
        if let Some(mut h) = unsafe { free_box(hub) } {
            dispose(move || {
                #[cfg(feature = "hub")]
                if let Some(hub) = h.hub.take() {
                    if let Err(e) = h.rt.block_on(hub.shutdown()) {
                        tracing::warn!(error = %e, "hub shutdown failed");
                    }
                }
                drop(h);
            });
        }
        Ok(())
    })
}

/// The bound listen address, `ip:port`.
///
/// @param hub The hub.
/// @return A string valid while the hub lives, or NULL when `hub` is NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_address(hub: *const hubmsg_hub) -> *const c_char {
    // SAFETY: the C API contract for `hub`.
    guard_or(std::ptr::null(), || Ok(unsafe { arg_ref(hub, "hub") }?.address.as_ptr()))
}

/// The connection string of the hub's `iothubowner` policy (for hubmsg_service_new()).
///
/// @param hub The hub.
/// @return A string valid while the hub lives, or NULL when `hub` is NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_service_connection_string(hub: *const hubmsg_hub) -> *const c_char {
    // SAFETY: the C API contract for `hub`.
    guard_or(std::ptr::null(), || Ok(unsafe { arg_ref(hub, "hub") }?.service_cs.as_ptr()))
}

#[cfg(feature = "hub")]
fn running(h: &hubmsg_hub) -> Result<&hubmsg_core::hub::Hub> {
    h.hub.as_ref().ok_or_else(|| Error::closed("hub"))
}

/// Registers a device with generated keys (durable on return).
///
/// @param hub The hub.
/// @param device_id The new device's id.
/// @param out_connection_string Optional (may be NULL): receives the device's connection string;
///        free with hubmsg_string_free().
/// @return HUBMSG_OK, HUBMSG_ALREADY_EXISTS, HUBMSG_INVALID_ARGUMENT, or HUBMSG_USAGE.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_create_device(
    hub: *mut hubmsg_hub,
    device_id: *const c_char,
    out_connection_string: *mut *mut c_char,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (out, h, id) = unsafe { (Out::optional(out_connection_string), arg_ref(hub, "hub")?, arg_str(device_id, "device_id")?) };
        #[cfg(feature = "hub")]
        {
            let hub = running(h)?;
            hubmsg_bind::block_on(&h.rt, "hubmsg_hub_create_device", hub.create_device(id))??;
            if let Some(out) = out {
                out.put_string(&hubmsg_bind::block_on(&h.rt, "hubmsg_hub_create_device", hub.device_connection_string(id))??);
            }
            Ok(HUBMSG_OK)
        }
        #[cfg(not(feature = "hub"))]
        {
            let _ = (out, h, id);
            start(&hubmsg_hub_options {
                data_dir: PathBuf::new(),
                listen: ([127, 0, 0, 1], 0).into(),
                feedback_interval: None,
                durability: None,
            })
            .map(|_| HUBMSG_OK)
        }
    })
}

/// The connection string of a registered device (primary key).
///
/// @param hub The hub.
/// @param device_id The device.
/// @param out Receives the string (NULL on failure); free with hubmsg_string_free().
/// @return HUBMSG_OK, HUBMSG_NOT_FOUND, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_hub_device_connection_string(
    hub: *const hubmsg_hub,
    device_id: *const c_char,
    out: *mut *mut c_char,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (out, h, id) = unsafe { (Out::new(out, "out")?, arg_ref(hub, "hub")?, arg_str(device_id, "device_id")?) };
        #[cfg(feature = "hub")]
        out.put_string(&hubmsg_bind::block_on(&h.rt, "hubmsg_hub_device_connection_string", running(h)?.device_connection_string(id))??);
        #[cfg(not(feature = "hub"))]
        let _ = (out, h, id);
        Ok(HUBMSG_OK)
    })
}
