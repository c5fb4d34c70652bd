//! `DeviceClient`: durable D2C sends with per-message outcomes, flush, status and stats, and C2D
//! commands (pull with `receive` / `messages()`, or pushed to `onMessage`) that the device
//! completes, abandons or rejects.
//!
//! A `C2dMessage` that is garbage-collected (or dropped by `close()`) without being settled is
//! released: the client forgets it and the hub delivers it again once its lock expires; it is
//! never locked forever.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hubmsg_bind::sources::C2dSource;
use hubmsg_bind::{outcome_name, Inbox, OutcomeBatch, SharedOutcome};
use hubmsg_core::device::C2dMessage as CoreC2d;
use hubmsg_core::outbox::Overflow;
use hubmsg_core::retry::RetryPolicy;
use hubmsg_core::store::Durability;
use hubmsg_core::transport::TlsOptions;
use hubmsg_core::{ConnectionStatus, Message};
use napi::bindgen_prelude::{Buffer, External, PromiseRaw};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Env, Status};
use napi_derive::napi;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::convert::{opt_ms, Body, Checked, Expiry, Fields, JsDate, Keys, OutMessage, Props};
use crate::errors::{invalid, IntoJs};
use crate::{runtime, Life};

// ---------------------------------------------------------------------------------------------
// Options

/// How a client reconnects: exponential backoff `initialDelayMs × multiplier^n` capped at
/// `maxDelayMs`, plus a random jitter in [0, jitterMs], until `maxElapsedMs` passed since the
/// first failure or `maxAttempts` attempts were made (unset: forever). `never: true`: the first
/// failure is final (status "failed"; `reconnect()` tries again). Defaults: 1 s doubling up to
/// 60 s with 1 s of jitter, forever.
#[napi(object, object_to_js = false)]
pub struct RetryOptions {
    /// First delay (ms).
    pub initial_delay_ms: Option<f64>,
    /// Largest delay (ms).
    pub max_delay_ms: Option<f64>,
    /// Growth per attempt (≥ 1).
    pub multiplier: Option<f64>,
    /// Largest random extra delay (ms).
    pub jitter_ms: Option<f64>,
    /// Give up this long after the first failure (ms).
    pub max_elapsed_ms: Option<f64>,
    /// Give up after this many attempts.
    pub max_attempts: Option<u32>,
    /// Never reconnect.
    pub never: Option<bool>,
}

impl Keys for RetryOptions {
    const NAME: &'static str = "retry options";
    const KEYS: &'static [&'static str] =
        &["initialDelayMs", "maxDelayMs", "multiplier", "jitterMs", "maxElapsedMs", "maxAttempts", "never"];
}

/// The engine policy of retry options.
pub(crate) fn retry_policy(r: RetryOptions) -> napi::Result<RetryPolicy> {
    if r.never == Some(true) {
        return Ok(RetryPolicy::none());
    }
    let d = RetryPolicy::default();
    let initial = opt_ms(r.initial_delay_ms, "initialDelayMs")?.unwrap_or(d.initial_delay);
    let max = opt_ms(r.max_delay_ms, "maxDelayMs")?.unwrap_or(d.max_delay);
    if initial > max {
        return Err(invalid(format!("initialDelayMs {initial:?} is larger than maxDelayMs {max:?}")));
    }
    let multiplier = r.multiplier.unwrap_or(d.multiplier);
    if !multiplier.is_finite() || multiplier < 1.0 {
        return Err(invalid(format!("multiplier {multiplier} must be a finite number ≥ 1.0")));
    }
    Ok(RetryPolicy {
        initial_delay: initial,
        max_delay: max,
        multiplier,
        jitter: opt_ms(r.jitter_ms, "jitterMs")?.unwrap_or(d.jitter),
        max_elapsed: opt_ms(r.max_elapsed_ms, "maxElapsedMs")?,
        max_attempts: r.max_attempts,
        healthy_after: max.clamp(Duration::from_millis(100), Duration::from_secs(10)),
    })
}

/// Options of `DeviceClient.fromConnectionString`.
#[napi(object, object_to_js = false)]
pub struct DeviceOptions {
    /// Directory of the durable outbox (created if missing; messages left there by an earlier
    /// client are recovered and delivered). Unset: the engine's durable default for the device
    /// id, `$HUBMSG_OUTBOX_DIR/<id>`, else `$XDG_STATE_HOME/hubmsg/outbox/<id>`, else
    /// `~/.local/state/hubmsg/outbox/<id>`.
    pub outbox_dir: Option<String>,
    /// An explicitly in-memory outbox (lost on a crash); not together with `outboxDir`.
    pub in_memory: Option<bool>,
    /// When a send is durable: "always" (fsync before `send` resolves, the default),
    /// "interval" / "interval:250ms" (fsync every N ms) or "never" (OS buffered).
    #[napi(ts_type = "'always' | 'interval' | 'never' | `interval:${string}`")]
    pub durability: Option<String>,
    /// Most messages the outbox holds (default 100,000).
    pub max_messages: Option<u32>,
    /// Most bytes the outbox holds (default 64 MiB).
    pub max_bytes: Option<f64>,
    /// What a send into a full outbox does: "reject" (HUBMSG_QUEUE_FULL, the default) or
    /// "drop_oldest" (counted in `stats().dropped`).
    #[napi(ts_type = "'reject' | 'drop_oldest'")]
    pub overflow: Option<String>,
    /// Reconnect pacing.
    #[napi(ts_type = "RetryOptions")]
    pub retry: Option<Checked<RetryOptions>>,
    /// A CA certificate (PEM) to trust; forces TLS.
    pub ca_file: Option<String>,
    /// MQTT keep-alive (ms, default 60 s).
    pub keep_alive_ms: Option<f64>,
    /// Most unacknowledged publishes on the wire (default 1,000).
    pub max_in_flight: Option<u32>,
    /// Limit for TCP + TLS + CONNACK (ms, default 30 s).
    pub connect_timeout_ms: Option<f64>,
}

impl Keys for DeviceOptions {
    const NAME: &'static str = "device options";
    const KEYS: &'static [&'static str] = &[
        "outboxDir",
        "inMemory",
        "durability",
        "maxMessages",
        "maxBytes",
        "overflow",
        "retry",
        "caFile",
        "keepAliveMs",
        "maxInFlight",
        "connectTimeoutMs",
    ];
}

fn device_options(cs: &str, o: Option<DeviceOptions>) -> napi::Result<hubmsg_core::DeviceOptions> {
    let mut opts = hubmsg_core::DeviceOptions::from_connection_string(cs).js()?;
    let Some(o) = o else { return Ok(opts) };
    if o.outbox_dir.is_some() && o.in_memory == Some(true) {
        return Err(invalid("give either outboxDir or inMemory: true, not both"));
    }
    // An unset outboxDir is core's durable default directory of the device id
    // (`OutboxOptions::default_dir`); inMemory: true an explicit in-memory outbox.
    opts.outbox.dir = o.outbox_dir.map(PathBuf::from);
    opts.outbox.in_memory = o.in_memory.unwrap_or(false);
    if let Some(d) = o.durability {
        opts.outbox.durability = d.parse::<Durability>().js()?;
    }
    if let Some(n) = o.max_messages {
        opts.outbox.max_messages = n as usize;
    }
    if let Some(b) = o.max_bytes {
        if !(b.is_finite() && b >= 1.0) {
            return Err(invalid(format!("maxBytes {b} must be a number ≥ 1")));
        }
        opts.outbox.max_bytes = b as usize;
    }
    if opts.outbox.max_messages == 0 {
        return Err(invalid("maxMessages must be at least 1"));
    }
    if let Some(v) = o.overflow {
        opts.outbox.overflow = v.parse::<Overflow>().js()?;
    }
    if let Some(r) = o.retry {
        opts.retry = retry_policy(r.0)?;
    }
    if let Some(f) = o.ca_file {
        opts.tls = Some(TlsOptions { ca_file: Some(f.into()) });
    }
    if let Some(k) = opt_ms(o.keep_alive_ms, "keepAliveMs")? {
        opts.keep_alive = k;
    }
    if let Some(n) = o.max_in_flight {
        opts.max_in_flight = (n as usize).max(1);
    }
    if let Some(t) = opt_ms(o.connect_timeout_ms, "connectTimeoutMs")? {
        opts.connect_timeout = t;
    }
    Ok(opts)
}

/// Options of one D2C message (`send`) or C2D message (`sendC2d`).
#[napi(object, object_to_js = false)]
pub struct SendOptions {
    /// Application properties (string values).
    #[napi(ts_type = "Record<string, string>")]
    pub properties: Option<Props>,
    /// `message-id` (default: a generated UUID).
    pub message_id: Option<String>,
    /// `correlation-id`.
    pub correlation_id: Option<String>,
    /// `content-type`, e.g. "application/json".
    pub content_type: Option<String>,
    /// `content-encoding`, e.g. "utf-8".
    pub content_encoding: Option<String>,
    /// When it expires: a `Date`, or a time to live in ms.
    #[napi(ts_type = "Date | number")]
    pub expiry: Option<Expiry>,
}

impl Keys for SendOptions {
    const NAME: &'static str = "send options";
    const KEYS: &'static [&'static str] = &["properties", "messageId", "correlationId", "contentType", "contentEncoding", "expiry"];
}

impl SendOptions {
    fn fields(self) -> Fields {
        Fields {
            properties: self.properties,
            message_id: self.message_id,
            correlation_id: self.correlation_id,
            content_type: self.content_type,
            content_encoding: self.content_encoding,
            expiry: self.expiry,
        }
    }
}

/// The engine message of `send(body, options)`.
pub(crate) fn message(body: Body, options: Option<Checked<SendOptions>>) -> napi::Result<Message> {
    options.map(|o| o.0.fields()).unwrap_or_default().message(body)
}

/// A message to `sendMany` with its options (declared for its TypeScript interface: `sendMany`
/// reads its items with `convert::OutMessage`, which also takes plain bodies).
#[napi(object, object_to_js = false)]
#[allow(dead_code)]
pub struct MessageInit {
    /// The payload.
    #[napi(ts_type = "Buffer | Uint8Array | string")]
    pub body: Body,
    /// Application properties (string values).
    #[napi(ts_type = "Record<string, string>")]
    pub properties: Option<Props>,
    /// `message-id`.
    pub message_id: Option<String>,
    /// `correlation-id`.
    pub correlation_id: Option<String>,
    /// `content-type`.
    pub content_type: Option<String>,
    /// `content-encoding`.
    pub content_encoding: Option<String>,
    /// A `Date`, or a time to live in ms.
    #[napi(ts_type = "Date | number")]
    pub expiry: Option<Expiry>,
}

// ---------------------------------------------------------------------------------------------
// The client

struct Inner {
    client: hubmsg_core::DeviceClient,
    c2d: Arc<Inbox<C2dSource>>,
    /// The task that feeds `onStatus` (it holds the callback).
    status_task: Mutex<Option<JoinHandle<()>>>,
    life: Life,
    rt: tokio::runtime::Handle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self.status_task.lock().take() {
            t.abort();
        }
        if let Some(t) = self.c2d.stop_task() {
            drop(t);
        }
        let client = self.client.clone();
        self.life.close_in_background(&self.rt, async move {
            let _ = client.close().await;
        });
    }
}

/// A device's connection to a hub: durable D2C sends and C2D commands. Create it with
/// `await DeviceClient.fromConnectionString(cs, { outboxDir })`; it connects in the background.
/// Close it with `await close()`.
#[napi]
pub struct DeviceClient {
    inner: Arc<Inner>,
}

/// One connection status, as `onStatus` reports it.
#[napi(object)]
pub struct StatusInfo {
    /// "connecting", "connected", "disconnected", "retrying", "failed" or "closed".
    #[napi(ts_type = "'connecting' | 'connected' | 'disconnected' | 'retrying' | 'failed' | 'closed'")]
    pub status: String,
    /// Why (the error of "disconnected" and "failed", the plan of "retrying"); may be empty.
    pub reason: String,
    /// The error code of a "failed" status (e.g. "HUBMSG_UNAUTHORIZED").
    pub code: Option<String>,
    /// The 1-based attempt number of a "retrying" status.
    pub attempt: Option<u32>,
    /// The delay (ms) before that attempt.
    pub delay_ms: Option<f64>,
}

/// The status name of a connection status.
pub(crate) fn status_name(s: &ConnectionStatus) -> &'static str {
    match s {
        ConnectionStatus::Connecting => "connecting",
        ConnectionStatus::Connected => "connected",
        ConnectionStatus::Disconnected { .. } => "disconnected",
        ConnectionStatus::Retrying { .. } => "retrying",
        ConnectionStatus::Failed { .. } => "failed",
        ConnectionStatus::Closed => "closed",
    }
}

impl From<&ConnectionStatus> for StatusInfo {
    fn from(s: &ConnectionStatus) -> StatusInfo {
        let mut i = StatusInfo { status: status_name(s).into(), reason: String::new(), code: None, attempt: None, delay_ms: None };
        match s {
            ConnectionStatus::Disconnected { reason } => i.reason = reason.clone(),
            ConnectionStatus::Retrying { attempt, delay } => {
                i.attempt = Some(*attempt);
                i.delay_ms = Some(delay.as_secs_f64() * 1000.0);
                i.reason = format!("attempt {attempt} in {} ms", delay.as_millis());
            }
            ConnectionStatus::Failed { kind, reason } => {
                i.code = Some(hubmsg_bind::errors::c_name(*kind));
                i.reason = reason.clone();
            }
            _ => {}
        }
        i
    }
}

/// Counters of a device client (a snapshot).
#[napi(object)]
pub struct DeviceStats {
    /// Messages in the outbox (queued + in flight).
    pub depth: i64,
    /// Bytes in the outbox.
    pub bytes: i64,
    /// Messages sent and not yet acknowledged.
    pub in_flight: i64,
    /// Messages acknowledged by the hub since the client started.
    pub delivered: i64,
    /// Messages removed by overflow "drop_oldest" since start.
    pub dropped: i64,
    /// Messages that expired before sending since start.
    pub expired: i64,
    /// Messages the receiver refused since start.
    pub rejected: i64,
    /// Messages recovered from the outbox directory at start.
    pub recovered: i64,
    /// Successful connects since start.
    pub connects: i64,
    /// Failed connection attempts and drops that led to a retry.
    pub retries: i64,
    /// C2D messages handed to the application.
    #[napi(js_name = "c2dReceived")]
    pub c2d_received: i64,
    /// C2D redeliveries kept from the application.
    #[napi(js_name = "c2dDuplicates")]
    pub c2d_duplicates: i64,
    /// SAS token renewals.
    pub renewals: i64,
    /// The last connection error, if any.
    pub last_error: Option<String>,
}

/// A thread-safe JS callback of one argument, called without waiting for it.
pub(crate) type Callback<T> = ThreadsafeFunction<T, (), T, Status, false>;

async fn connect(opts: hubmsg_core::DeviceOptions) -> napi::Result<DeviceClient> {
    let client = hubmsg_core::DeviceClient::connect(opts).await.js()?;
    let c = client.clone();
    Ok(DeviceClient {
        inner: Arc::new(Inner {
            client,
            c2d: Arc::new(Inbox::lazy("C2D messages", move || Ok(C2dSource(c.c2d()?)))),
            status_task: Mutex::new(None),
            life: Life::new("device client"),
            rt: runtime(),
        }),
    })
}

impl DeviceClient {
    /// Queues `msgs` in order (one fsync); resolves to their deliveries.
    fn send_batch<'e>(&self, env: &'e Env, msgs: Vec<Message>) -> napi::Result<PromiseRaw<'e, DeliveryBatch>> {
        self.inner.life.check().js()?;
        let client = self.inner.client.clone();
        env.spawn_future(async move { client.send_batch(msgs).await.map(|ds| External::new(OutcomeBatch::new(ds))).js() })
    }
}

#[napi]
impl DeviceClient {
    /// Opens the outbox and starts connecting in the background; resolves to the client.
    /// Rejects with HUBMSG_INVALID_ARGUMENT (a bad connection string or option) or
    /// HUBMSG_STORAGE (the outbox directory cannot be opened or is locked by another process).
    #[napi(
        configurable = true,
        ts_args_type = "connectionString: string, options?: DeviceOptions",
        ts_return_type = "Promise<DeviceClient>"
    )]
    pub fn from_connection_string<'e>(
        env: &'e Env,
        connection_string: String,
        options: Option<Checked<DeviceOptions>>,
    ) -> napi::Result<PromiseRaw<'e, DeviceClient>> {
        let opts = device_options(&connection_string, options.map(|o| o.0))?;
        env.spawn_future(connect(opts))
    }

    /// The device id.
    #[napi(getter)]
    pub fn device_id(&self) -> String {
        self.inner.client.device_id().to_string()
    }

    /// Queues a message; resolves once it is durable in the outbox (per `durability`), to its
    /// `Delivery` (whose `outcome()` resolves once the hub has it). Rejects with
    /// HUBMSG_QUEUE_FULL (outbox full, overflow "reject"), HUBMSG_MESSAGE_TOO_LARGE
    /// (> 256 KB), HUBMSG_STORAGE or HUBMSG_CLOSED; wrong types throw a TypeError.
    #[napi(ts_args_type = "body: Buffer | Uint8Array | string, options?: SendOptions", ts_return_type = "Promise<Delivery>")]
    pub fn send<'e>(&self, env: &'e Env, body: Body, options: Option<Checked<SendOptions>>) -> napi::Result<PromiseRaw<'e, Delivery>> {
        let msg = message(body, options)?;
        self.inner.life.check().js()?;
        let client = self.inner.client.clone();
        env.spawn_future(async move { client.send(msg).await.map(Delivery::new).js() })
    }

    /// Queues several messages (each a body or a `MessageInit`) in order; resolves once all are
    /// durable — they share one fsync, which is how to send fast. A bad item rejects the whole
    /// batch before anything is queued, and so does a batch the outbox has no room for
    /// (HUBMSG_QUEUE_FULL with overflow "reject"): it can be sent again as it is.
    #[napi(ts_args_type = "messages: Array<Buffer | Uint8Array | string | MessageInit>", ts_return_type = "Promise<Delivery[]>")]
    pub fn send_many<'e>(&self, env: &'e Env, messages: Vec<OutMessage>) -> napi::Result<PromiseRaw<'e, DeliveryBatch>> {
        self.send_batch(env, messages.into_iter().map(|m| m.0).collect())
    }

    /// `sendMany` for a batch of plain items (each a Buffer / Uint8Array / string body, or an
    /// object with only `body` and `messageId`), which the JS layer packs: the bodies back to
    /// back in `bodies`, the byte length of each in `lengths`, each item's message id (or null)
    /// in `ids`. The same messages, checks and result as `sendMany`; one copy of all bodies and
    /// no property reads per item. Not part of the API (`sendMany` calls it).
    #[napi(js_name = "_sendManyPacked", skip_typescript)]
    pub fn send_many_packed<'e>(
        &self,
        env: &'e Env,
        bodies: &[u8],
        lengths: &[u32],
        ids: Vec<Option<String>>,
    ) -> napi::Result<PromiseRaw<'e, DeliveryBatch>> {
        self.send_batch(env, crate::convert::unpack_messages(bodies, lengths, ids)?)
    }

    /// Resolves once every queued message reached an outcome; rejects with HUBMSG_TIMEOUT
    /// after `timeoutMs` (default: no limit) with some still pending (nothing is lost:
    /// delivery goes on).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn flush<'e>(&self, env: &'e Env, timeout_ms: Option<f64>) -> napi::Result<PromiseRaw<'e, ()>> {
        let timeout = opt_ms(timeout_ms, "timeoutMs")?.unwrap_or(Duration::from_secs(100 * 365 * 86400));
        self.inner.life.check().js()?;
        let client = self.inner.client.clone();
        env.spawn_future(async move { client.flush(timeout).await.js() })
    }

    /// The connection status.
    #[napi(getter, ts_return_type = "'connecting' | 'connected' | 'disconnected' | 'retrying' | 'failed' | 'closed'")]
    pub fn status(&self) -> String {
        status_name(&self.inner.client.status()).into()
    }

    /// Calls `callback` with the current status and then with every change, until `close()`
    /// (which releases it). A later call replaces the callback. It runs on the JS thread and
    /// never blocks the engine; while it is registered the client keeps Node running.
    #[napi(ts_args_type = "callback: (status: StatusInfo) => void")]
    pub fn on_status(&self, callback: Callback<StatusInfo>) -> napi::Result<()> {
        self.inner.life.check().js()?;
        let mut rx = self.inner.client.status_watch();
        let task = self.inner.rt.spawn(async move {
            loop {
                let s = StatusInfo::from(&*rx.borrow_and_update());
                let last = s.status == "closed";
                callback.call(s, ThreadsafeFunctionCallMode::NonBlocking);
                if last || rx.changed().await.is_err() {
                    break;
                }
            }
        });
        if let Some(old) = self.inner.status_task.lock().replace(task) {
            old.abort();
        }
        Ok(())
    }

    /// Counters of the outbox and the connection.
    #[napi]
    pub fn stats(&self) -> DeviceStats {
        let s = self.inner.client.stats();
        let o = s.outbox;
        DeviceStats {
            depth: o.depth as i64,
            bytes: o.bytes as i64,
            in_flight: o.in_flight as i64,
            delivered: o.delivered as i64,
            dropped: o.dropped as i64,
            expired: o.expired as i64,
            rejected: o.rejected as i64,
            recovered: o.recovered as i64,
            connects: s.connects as i64,
            retries: s.retries as i64,
            c2d_received: s.c2d_received as i64,
            c2d_duplicates: s.c2d_duplicates as i64,
            renewals: s.renewals as i64,
            last_error: s.last_error,
        }
    }

    /// Asks a client in status "failed" to try connecting again (e.g. after the device was
    /// re-enabled).
    #[napi]
    pub fn reconnect(&self) -> napi::Result<()> {
        self.inner.life.check().js()?;
        self.inner.client.reconnect();
        Ok(())
    }

    /// The next C2D message within `timeoutMs` (default: until one arrives), or null on
    /// timeout. The first call subscribes to C2D. Rejects with HUBMSG_CLOSED once the client is
    /// closed. Messages are pulled one at a time: the hub holds back the rest (its delivery
    /// window), so a slow consumer is never buffered for without bound.
    #[napi(ts_return_type = "Promise<C2dMessage | null>")]
    pub fn receive<'e>(&self, env: &'e Env, timeout_ms: Option<f64>) -> napi::Result<PromiseRaw<'e, Option<C2dMessage>>> {
        let timeout = opt_ms(timeout_ms, "timeoutMs")?;
        self.inner.life.check().js()?;
        let next = self.inner.c2d.next(&self.inner.rt, timeout);
        env.spawn_future(async move { Ok(next.await.js()?.map(C2dMessage::new)) })
    }

    /// The C2D messages as an async iterator (`for await (const msg of device.messages())`);
    /// it ends when the client is closed.
    #[napi]
    pub fn messages(&self) -> napi::Result<C2dStream> {
        self.inner.life.check().js()?;
        self.inner.c2d.start_pull(&self.inner.rt).js()?;
        Ok(C2dStream { inner: self.inner.clone() })
    }

    /// Calls `handler` with every C2D message instead (not together with `receive` /
    /// `messages()`), until `close()` releases it; while it is registered the client keeps Node
    /// running. The handler settles each message (`complete()`, `abandon()`, `reject()`); it
    /// runs on the JS thread and never blocks the engine.
    #[napi(ts_args_type = "handler: (message: C2dMessage) => void")]
    pub fn on_message(&self, handler: Callback<C2dMessage>) -> napi::Result<()> {
        self.inner.life.check().js()?;
        self.inner
            .c2d
            .forward(&self.inner.rt, move |m| match m {
                Ok(m) => handler.call(C2dMessage::new(m), ThreadsafeFunctionCallMode::NonBlocking) == Status::Ok,
                Err(e) => {
                    tracing::error!(error = %e, "C2D stream failed; no more messages for onMessage");
                    false
                }
            })
            .js()
    }

    /// Waits up to 10 s for messages in flight, persists the outbox and closes it; pending
    /// `receive()` / iterations end, and the callbacks are released (so Node can exit).
    /// Undelivered messages stay in the outbox directory for the next client on it. Idempotent.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, ()>> {
        let first = self.inner.life.close();
        let inner = self.inner.clone();
        env.spawn_future(async move {
            if !first {
                return Ok(());
            }
            let r = inner.client.close().await;
            // The status watcher ends by itself once it handed "closed" to the callback (or the
            // client's status channel ended); aborting it at once could lose that last status
            // under load (the onStatus test saw "connected" last). Only a stuck one is aborted.
            let status = inner.status_task.lock().take();
            if let Some(mut t) = status {
                if tokio::time::timeout(Duration::from_secs(2), &mut t).await.is_err() {
                    t.abort();
                    let _ = t.await;
                }
            }
            // Stopping the pump drops C2D messages not handed out yet (they are released) and
            // ends pending pulls.
            if let Some(pump) = inner.c2d.stop_task() {
                let _ = pump.await;
            }
            r.js()
        })
    }

    /// Whether `close()` was called.
    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.inner.life.is_closed()
    }
}

/// The C2D messages of a device (`DeviceClient.messages()`): `next()` or `for await`.
#[napi(js_name = "C2dStream")]
pub struct C2dStream {
    inner: Arc<Inner>,
}

#[napi]
impl C2dStream {
    /// The next message, or null once the client is closed.
    #[napi(ts_return_type = "Promise<C2dMessage | null>")]
    pub fn next<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, Option<C2dMessage>>> {
        if self.inner.life.is_closed() {
            return env.spawn_future(async { Ok(None) });
        }
        let next = self.inner.c2d.next(&self.inner.rt, None);
        env.spawn_future(async move { Ok(crate::end_is_none(next.await)?.map(C2dMessage::new)) })
    }

    /// Up to `max` messages (default 100, at most 10,000; and at most 4 MiB of bodies unless one
    /// message alone is larger): waits up to `timeoutMs` (default: until one arrives) for the
    /// first, then takes those already received, without waiting again. An empty array on
    /// timeout; null once the client is closed. Settle each one as a message from `next()`.
    #[napi(ts_args_type = "max?: number, timeoutMs?: number", ts_return_type = "Promise<C2dMessage[] | null>")]
    pub fn next_batch<'e>(
        &self,
        env: &'e Env,
        max: Option<f64>,
        timeout_ms: Option<f64>,
    ) -> napi::Result<PromiseRaw<'e, Option<Vec<C2dMessage>>>> {
        let limits = crate::batch_limits(max, |m: &CoreC2d| m.message.body.len())?;
        let timeout = opt_ms(timeout_ms, "timeoutMs")?;
        if self.inner.life.is_closed() {
            return env.spawn_future(async { Ok(None) });
        }
        let next = self.inner.c2d.next_batch(&self.inner.rt, limits, timeout);
        env.spawn_future(async move { Ok(crate::end_is_none(next.await.map(Some))?.map(|b| b.into_iter().map(C2dMessage::new).collect())) })
    }

    /// Messages received from the hub that no `next()` took yet.
    #[napi(getter)]
    pub fn buffered(&self) -> u32 {
        self.inner.c2d.buffered() as u32
    }

    /// Whether its client was closed (the stream ends then).
    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.inner.life.is_closed()
    }
}

// ---------------------------------------------------------------------------------------------
// Outcomes

/// One accepted message: its id and sequence number, and its outcome to wait for.
#[napi]
pub struct Delivery {
    outcome: SharedOutcome,
}

impl Delivery {
    fn new(d: hubmsg_core::device::Delivery) -> Delivery {
        Delivery { outcome: SharedOutcome::new(d) }
    }
}

/// `Delivery.outcome()` of `o`.
fn outcome_promise<'e>(env: &'e Env, o: &SharedOutcome, timeout_ms: Option<f64>) -> napi::Result<PromiseRaw<'e, String>> {
    let timeout = opt_ms(timeout_ms, "timeoutMs")?;
    let wait = o.wait(timeout);
    env.spawn_future(async move { wait.await.map(|o| outcome_name(o).to_string()).js() })
}

/// `Delivery.peek()` of `o`.
fn peek(o: &SharedOutcome) -> napi::Result<Option<String>> {
    o.poll().map(|r| r.map(|o| outcome_name(o).to_string())).transpose().js()
}

#[napi]
impl Delivery {
    /// The message id (the one given, or the generated UUID).
    #[napi(getter)]
    pub fn message_id(&self) -> String {
        self.outcome.message_id().to_string()
    }

    /// The message's sequence number in the outbox.
    #[napi(getter)]
    pub fn sequence_number(&self) -> i64 {
        self.outcome.sequence_number() as i64
    }

    /// Resolves to "delivered" (the hub has it durably), "expired", "dropped" or "rejected";
    /// rejects with HUBMSG_TIMEOUT after `timeoutMs` (default: no limit) or HUBMSG_CLOSED when
    /// the client closed first (the message stays in the outbox).
    #[napi(ts_return_type = "Promise<'delivered' | 'expired' | 'dropped' | 'rejected'>")]
    pub fn outcome<'e>(&self, env: &'e Env, timeout_ms: Option<f64>) -> napi::Result<PromiseRaw<'e, String>> {
        outcome_promise(env, &self.outcome, timeout_ms)
    }

    /// The outcome if it is known already, else null.
    #[napi(ts_return_type = "'delivered' | 'expired' | 'dropped' | 'rejected' | null")]
    pub fn peek(&self) -> napi::Result<Option<String>> {
        peek(&self.outcome)
    }
}

/// The deliveries of one `sendMany` batch (an opaque value in JS): the JS layer hands out a
/// `Delivery` per message whose members call the `_delivery*` functions with the batch and the
/// message's index — one native value per batch instead of a native object per message (which
/// cost more than sending the message); a message's outcome handle is made only when asked for.
type DeliveryBatch = External<OutcomeBatch>;

fn batch_at(batch: &OutcomeBatch, index: u32) -> napi::Result<(String, u64)> {
    batch.identity(index as usize).ok_or_else(|| invalid(format!("no message {index} in a batch of {}", batch.len())))
}

fn batch_outcome_at(batch: &OutcomeBatch, index: u32) -> napi::Result<SharedOutcome> {
    batch.outcome(index as usize).ok_or_else(|| invalid(format!("no message {index} in a batch of {}", batch.len())))
}

/// The number of messages of a `sendMany` batch. Not part of the API (the JS layer's).
#[napi(js_name = "_deliveryLength", skip_typescript)]
pub fn batch_length(batch: &DeliveryBatch) -> u32 {
    batch.len() as u32
}

/// `Delivery.messageId` of message `index` of a `sendMany` batch. Not part of the API.
#[napi(js_name = "_deliveryMessageId", skip_typescript)]
pub fn batch_message_id(batch: &DeliveryBatch, index: u32) -> napi::Result<String> {
    Ok(batch_at(batch, index)?.0)
}

/// `Delivery.sequenceNumber` of message `index` of a `sendMany` batch. Not part of the API.
#[napi(js_name = "_deliverySequenceNumber", skip_typescript)]
pub fn batch_sequence_number(batch: &DeliveryBatch, index: u32) -> napi::Result<i64> {
    Ok(batch_at(batch, index)?.1 as i64)
}

/// `Delivery.outcome()` of message `index` of a `sendMany` batch. Not part of the API.
#[napi(js_name = "_deliveryOutcome", skip_typescript)]
pub fn batch_outcome<'e>(env: &'e Env, batch: &DeliveryBatch, index: u32, timeout_ms: Option<f64>) -> napi::Result<PromiseRaw<'e, String>> {
    outcome_promise(env, &batch_outcome_at(batch, index)?, timeout_ms)
}

/// `Delivery.peek()` of message `index` of a `sendMany` batch. Not part of the API.
#[napi(js_name = "_deliveryPeek", skip_typescript)]
pub fn batch_peek(batch: &DeliveryBatch, index: u32) -> napi::Result<Option<String>> {
    peek(&batch_outcome_at(batch, index)?)
}

// ---------------------------------------------------------------------------------------------
// Received messages

/// What the getters of a received message read: the decoded message, and the two fields every
/// consumer reads, which an event serves without decoding the rest.
pub(crate) trait Received {
    /// The whole message (decoded on first use for an event).
    fn msg(&self) -> &Message;
    /// The body.
    fn body_bytes(&self) -> bytes::Bytes {
        self.msg().body.clone()
    }
    /// `message-id`.
    fn mid(&self) -> Option<&str> {
        self.msg().message_id.as_deref()
    }
}

/// Getters of the message fields, for the classes of received messages (which implement
/// [`Received`]).
macro_rules! message_getters {
    ($ty:ident) => {
        #[napi]
        impl $ty {
            /// The payload.
            #[napi(getter)]
            pub fn body(&self) -> Buffer {
                self.body_bytes().to_vec().into()
            }

            /// `message-id`, if set.
            #[napi(getter)]
            pub fn message_id(&self) -> Option<String> {
                self.mid().map(str::to_string)
            }

            /// `correlation-id`, if set.
            #[napi(getter)]
            pub fn correlation_id(&self) -> Option<String> {
                self.msg().correlation_id.clone()
            }

            /// `content-type`, if set.
            #[napi(getter)]
            pub fn content_type(&self) -> Option<String> {
                self.msg().content_type.clone()
            }

            /// `content-encoding`, if set.
            #[napi(getter)]
            pub fn content_encoding(&self) -> Option<String> {
                self.msg().content_encoding.clone()
            }

            /// `user-id`, if set.
            #[napi(getter)]
            pub fn user_id(&self) -> Option<String> {
                self.msg().user_id.clone()
            }

            /// The application properties (a new object on each access).
            #[napi(getter, ts_return_type = "Record<string, string>")]
            pub fn properties(&self) -> Props {
                Props(self.msg().properties.clone())
            }

            /// The properties the hub stamped (`iothub-connection-device-id`,
            /// `iothub-enqueuedtime`, `iothub-ack`, `$.to`, …), a new object on each access.
            #[napi(getter, ts_return_type = "Record<string, string>")]
            pub fn system_properties(&self) -> Props {
                Props(self.msg().system.clone())
            }

            /// When the sender created it, if known.
            #[napi(getter, ts_return_type = "Date | null")]
            pub fn creation_time(&self) -> Option<JsDate> {
                self.msg().creation_time_ms.map(JsDate)
            }

            /// When it expires, if it does.
            #[napi(getter, ts_return_type = "Date | null")]
            pub fn expiry_time(&self) -> Option<JsDate> {
                self.msg().expiry_time_ms.map(JsDate)
            }
        }
    };
}

pub(crate) use message_getters;

/// A cloud-to-device message. Settle it once with `complete()`, `abandon()` or `reject()`; one
/// left unsettled (garbage-collected) is released and delivered again once its lock expires.
#[napi(js_name = "C2dMessage")]
pub struct C2dMessage {
    msg: Message,
    sequence_number: u64,
    settle: Mutex<Option<CoreC2d>>,
}

impl C2dMessage {
    fn new(m: CoreC2d) -> C2dMessage {
        C2dMessage { msg: m.message.clone(), sequence_number: m.sequence_number, settle: Mutex::new(Some(m)) }
    }

    fn settle(&self, how: fn(CoreC2d) -> hubmsg_core::Result<()>) -> napi::Result<()> {
        let m = self.settle.lock().take().ok_or_else(|| {
            crate::errors::to_js(hubmsg_core::Error::new(hubmsg_core::ErrorKind::Usage, "this C2D message was already settled"))
        })?;
        how(m).js()
    }
}

impl Received for C2dMessage {
    fn msg(&self) -> &Message {
        &self.msg
    }
}

message_getters!(C2dMessage);

#[napi]
impl C2dMessage {
    /// Its sequence number in the device queue (0 when the hub sends none, e.g. Azure IoT Hub,
    /// whose messages can only be completed).
    #[napi(getter)]
    pub fn sequence_number(&self) -> i64 {
        self.sequence_number as i64
    }

    /// Whether it was settled already.
    #[napi(getter)]
    pub fn settled(&self) -> bool {
        self.settle.lock().is_none()
    }

    /// Completes it: the hub removes it (feedback "Success" if asked for). Throws
    /// HUBMSG_USAGE when settled already.
    #[napi]
    pub fn complete(&self) -> napi::Result<()> {
        self.settle(CoreC2d::complete)
    }

    /// Abandons it: back to the queue (delivery count + 1; dead-lettered with feedback
    /// "DeliveryCountExceeded" at the maximum).
    #[napi]
    pub fn abandon(&self) -> napi::Result<()> {
        self.settle(CoreC2d::abandon)
    }

    /// Rejects it: dead-lettered (feedback "Rejected" if asked for).
    #[napi]
    pub fn reject(&self) -> napi::Result<()> {
        self.settle(CoreC2d::reject)
    }
}
