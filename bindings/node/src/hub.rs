//! `Hub`: a full hubmsg hub inside the Node process (for tests, demos and gateways), on
//! 127.0.0.1 port 0 by default, so a test suite needs no external process.

use std::net::SocketAddr;
use std::sync::Arc;

use hubmsg_core::hub::{Hub as CoreHub, HubConfig};
use hubmsg_core::store::Durability;
use napi::bindgen_prelude::PromiseRaw;
use napi::Env;
use napi_derive::napi;

use tokio::sync::RwLock;

use crate::convert::{opt_ms, Checked, Keys};
use crate::errors::{invalid, IntoJs};

/// Options of `Hub.start`.
#[napi(object, object_to_js = false)]
pub struct HubOptions {
    /// Plain MQTT listen address `ip:port` (default "127.0.0.1:0": a free port).
    pub listen: Option<String>,
    /// How long a C2D feedback record may wait before its batch is sent (ms; IoT Hub: 15 s).
    pub feedback_interval_ms: Option<f64>,
    /// How long a delivered C2D message stays locked (ms, default 60 s).
    pub lock_timeout_ms: Option<f64>,
    /// "always" (default), "interval", "interval:250ms" or "never".
    #[napi(ts_type = "'always' | 'interval' | 'never' | `interval:${string}`")]
    pub durability: Option<String>,
    /// D2C partitions of a new data directory (default 4).
    pub partitions: Option<u32>,
}

impl Keys for HubOptions {
    const NAME: &'static str = "hub options";
    const KEYS: &'static [&'static str] = &["listen", "feedbackIntervalMs", "lockTimeoutMs", "durability", "partitions"];
}

/// An embedded hub. `await Hub.start(dataDir)` starts it; `await shutdown()` stops it.
#[napi]
pub struct Hub {
    /// The running hub; `None` once shut down. Calls hold the read lock across their awaits
    /// (the engine's hub accessors are async); `shutdown()` takes the write lock and the hub.
    hub: Arc<RwLock<Option<CoreHub>>>,
    address: String,
    host_name: String,
    service_cs: String,
    data_dir: String,
}

impl Hub {
    /// Runs `f` on the hub while it runs (read lock held across the await), else `HUBMSG_CLOSED`.
    fn with_hub<'e, T, F>(&self, env: &'e Env, f: F) -> napi::Result<PromiseRaw<'e, T>>
    where
        T: napi::bindgen_prelude::ToNapiValue + Send + 'static,
        F: for<'h> FnOnce(&'h CoreHub) -> std::pin::Pin<Box<dyn std::future::Future<Output = hubmsg_core::Result<T>> + Send + 'h>>
            + Send
            + 'static,
    {
        let hub = self.hub.clone();
        env.spawn_future(async move {
            let g = hub.read().await;
            let h = g.as_ref().ok_or_else(|| hubmsg_core::Error::closed("hub")).js()?;
            f(h).await.js()
        })
    }
}

#[napi]
impl Hub {
    /// Starts a hub keeping its data in `dataDir` (created if missing, reopened if it exists);
    /// resolves once it listens.
    #[napi(configurable = true, ts_args_type = "dataDir: string, options?: HubOptions", ts_return_type = "Promise<Hub>")]
    pub fn start<'e>(env: &'e Env, data_dir: String, options: Option<Checked<HubOptions>>) -> napi::Result<PromiseRaw<'e, Hub>> {
        let o = options.map(|o| o.0);
        let listen = o.as_ref().and_then(|o| o.listen.clone()).unwrap_or_else(|| "127.0.0.1:0".into());
        let addr: SocketAddr = listen.parse().map_err(|_| invalid(format!("listen '{listen}' is not ip:port (e.g. 127.0.0.1:0)")))?;
        let mut cfg = HubConfig::new(&data_dir);
        cfg.mqtt = Some(addr);
        cfg.host_name = addr.ip().to_string();
        if let Some(o) = o {
            if let Some(p) = o.partitions {
                if p == 0 {
                    return Err(invalid("partitions must be at least 1"));
                }
                cfg.partitions = p;
            }
            if let Some(f) = opt_ms(o.feedback_interval_ms, "feedbackIntervalMs")? {
                cfg.feedback_interval = f.max(std::time::Duration::from_millis(1));
            }
            if let Some(l) = opt_ms(o.lock_timeout_ms, "lockTimeoutMs")? {
                cfg.c2d.lock = l.max(std::time::Duration::from_millis(100));
            }
            if let Some(d) = o.durability {
                cfg.durability = d.parse::<Durability>().js()?;
            }
        }
        env.spawn_future(async move {
            let hub = CoreHub::start(cfg).await.js()?;
            Ok(Hub {
                address: hub.mqtt_addr().map(|a| a.to_string()).unwrap_or_default(),
                host_name: hub.host_name(),
                service_cs: hub.service_connection_string(),
                hub: Arc::new(RwLock::new(Some(hub))),
                data_dir,
            })
        })
    }

    /// The bound listen address, `ip:port`.
    #[napi(getter)]
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// The bound port.
    #[napi(getter)]
    pub fn port(&self) -> u32 {
        self.address.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
    }

    /// `HostName` of connection strings for this hub (`127.0.0.1:PORT`).
    #[napi(getter)]
    pub fn host_name(&self) -> String {
        self.host_name.clone()
    }

    /// The data directory.
    #[napi(getter)]
    pub fn data_dir(&self) -> String {
        self.data_dir.clone()
    }

    /// The connection string of the hub's `iothubowner` policy (for `ServiceClient`).
    #[napi(getter)]
    pub fn service_connection_string(&self) -> String {
        self.service_cs.clone()
    }

    /// Registers a device with generated keys (durable on return); resolves to its connection
    /// string. Rejects with HUBMSG_ALREADY_EXISTS.
    #[napi(ts_return_type = "Promise<string>")]
    pub fn create_device<'e>(&self, env: &'e Env, device_id: String) -> napi::Result<PromiseRaw<'e, String>> {
        self.with_hub(env, move |h| {
            Box::pin(async move {
                h.create_device(&device_id).await?;
                h.device_connection_string(&device_id).await
            })
        })
    }

    /// Resolves to the connection string of a registered device (primary key). Rejects with
    /// HUBMSG_NOT_FOUND.
    #[napi(ts_return_type = "Promise<string>")]
    pub fn device_connection_string<'e>(&self, env: &'e Env, device_id: String) -> napi::Result<PromiseRaw<'e, String>> {
        self.with_hub(env, move |h| Box::pin(async move { h.device_connection_string(&device_id).await }))
    }

    /// Whether the hub is running.
    #[napi(getter)]
    pub fn running(&self) -> bool {
        // The write lock is only taken by a shutdown: the hub is stopping.
        self.hub.try_read().map(|g| g.is_some()).unwrap_or(false)
    }

    /// Stops the hub: closes every connection, persists checkpoints and closes the stores.
    /// Idempotent.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn shutdown<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, ()>> {
        let hub = self.hub.clone();
        env.spawn_future(async move {
            let taken = hub.write().await.take();
            if let Some(h) = taken {
                h.shutdown().await.js()?;
            }
            Ok(())
        })
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        // Only a hub nobody shut down needs stopping here (a finalizer can run at Node's exit,
        // when no runtime is left to spawn on). The write lock is free unless a shutdown holds it.
        let taken = self.hub.try_write().ok().and_then(|mut g| g.take());
        if let Some(h) = taken {
            crate::runtime().spawn(async move {
                let _ = h.shutdown().await;
            });
        }
    }
}
