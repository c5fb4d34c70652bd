//! `ServiceClient`: device identities, C2D sends (awaited per message or read as feedback
//! batches), purge, and D2C events by consumer group (`EventStream`) with ack and checkpoint.

use std::sync::Arc;
use std::time::Duration;

use hubmsg_bind::sources::{EventsControl, EventsSource, FeedbackSource};
use hubmsg_bind::Inbox;
use hubmsg_core::proto::{
    AckMode, CreateDevice, DeviceIdentity as CoreIdentity, DeviceStatus, FeedbackRecord as CoreFeedback, StartPosition,
};
use hubmsg_core::service::{C2dOptions, Event as CoreEvent, FeedbackBatch as CoreBatch, ServiceOptions as CoreOptions};
use hubmsg_core::transport::TlsOptions;
use hubmsg_core::{Error, ErrorKind, Message};
use napi::bindgen_prelude::{Buffer, External, PromiseRaw};
use napi::Env;
use napi_derive::napi;

use crate::convert::{opt_ms, Body, Checked, Expiry, Fields, JsDate, Keys, Props, Start};
use crate::device::{message_getters, retry_policy, status_name, Received, RetryOptions};
use crate::errors::{invalid, IntoJs};
use crate::{end_is_none, runtime, Life};

/// Options of `ServiceClient.fromConnectionString`.
#[napi(object, object_to_js = false)]
pub struct ServiceOptions {
    /// A CA certificate (PEM) to trust; forces TLS.
    pub ca_file: Option<String>,
    /// Bound of every request, across reconnects (ms, default 30 s).
    pub request_timeout_ms: Option<f64>,
    /// Reconnect pacing.
    #[napi(ts_type = "RetryOptions")]
    pub retry: Option<Checked<RetryOptions>>,
}

impl Keys for ServiceOptions {
    const NAME: &'static str = "service options";
    const KEYS: &'static [&'static str] = &["caFile", "requestTimeoutMs", "retry"];
}

/// Options of `createDevice`.
#[napi(object, object_to_js = false)]
pub struct CreateDeviceOptions {
    /// The primary key (base64; generated when unset).
    pub primary_key: Option<String>,
    /// The secondary key (base64; generated when unset).
    pub secondary_key: Option<String>,
    /// Whether it may connect (default true).
    pub enabled: Option<bool>,
}

impl Keys for CreateDeviceOptions {
    const NAME: &'static str = "createDevice options";
    const KEYS: &'static [&'static str] = &["primaryKey", "secondaryKey", "enabled"];
}

/// Options of `sendC2d`.
#[napi(object, object_to_js = false, js_name = "C2dSendOptions")]
pub struct C2dSendOptions {
    /// Feedback wanted: "none" (default), "positive", "negative" or "full".
    #[napi(ts_type = "'none' | 'positive' | 'negative' | 'full'")]
    pub ack: Option<String>,
    /// Time to live (ms, 1 s – 48 h; default: the expiry, else the hub's 1 h).
    pub ttl_ms: Option<f64>,
    /// Application properties (string values).
    #[napi(ts_type = "Record<string, string>")]
    pub properties: Option<Props>,
    /// `message-id` (default: generated).
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

impl Keys for C2dSendOptions {
    const NAME: &'static str = "sendC2d options";
    const KEYS: &'static [&'static str] =
        &["ack", "ttlMs", "properties", "messageId", "correlationId", "contentType", "contentEncoding", "expiry"];
}

/// Options of `sendC2dAndWait`.
#[napi(object, object_to_js = false, js_name = "C2dWaitOptions")]
pub struct C2dWaitOptions {
    /// Feedback asked for: "full" (default), "positive" or "negative".
    #[napi(ts_type = "'positive' | 'negative' | 'full'")]
    pub ack: Option<String>,
    /// How long to wait for the feedback (ms, default 60 s).
    pub timeout_ms: Option<f64>,
    /// Time to live (ms).
    pub ttl_ms: Option<f64>,
    /// Application properties (string values).
    #[napi(ts_type = "Record<string, string>")]
    pub properties: Option<Props>,
    /// `message-id` (default: generated).
    pub message_id: Option<String>,
    /// `correlation-id`.
    pub correlation_id: Option<String>,
}

impl Keys for C2dWaitOptions {
    const NAME: &'static str = "sendC2dAndWait options";
    const KEYS: &'static [&'static str] = &["ack", "timeoutMs", "ttlMs", "properties", "messageId", "correlationId"];
}

/// Options of `events`.
#[napi(object, object_to_js = false)]
pub struct EventsOptions {
    /// Where the group's first read starts: "checkpoint" (default), "earliest", "latest", a
    /// sequence number or a `Date`; afterwards reading resumes at the checkpoint.
    #[napi(ts_type = "'checkpoint' | 'earliest' | 'latest' | number | Date")]
    pub from: Option<Start>,
}

impl Keys for EventsOptions {
    const NAME: &'static str = "events options";
    const KEYS: &'static [&'static str] = &["from"];
}

/// A device identity from the registry.
#[napi(object)]
pub struct DeviceIdentity {
    /// Device id.
    pub device_id: String,
    /// Generation id (tells re-created devices with the same id apart).
    pub generation_id: String,
    /// "enabled" or "disabled".
    #[napi(ts_type = "'enabled' | 'disabled'")]
    pub status: String,
    /// Primary symmetric key (base64).
    pub primary_key: String,
    /// Secondary symmetric key (base64).
    pub secondary_key: String,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: f64,
}

impl From<CoreIdentity> for DeviceIdentity {
    fn from(d: CoreIdentity) -> DeviceIdentity {
        DeviceIdentity {
            device_id: d.device_id,
            generation_id: d.generation_id,
            status: match d.status {
                DeviceStatus::Enabled => "enabled".into(),
                DeviceStatus::Disabled => "disabled".into(),
            },
            primary_key: d.primary_key,
            secondary_key: d.secondary_key,
            created_ms: d.created_ms as f64,
        }
    }
}

/// The hub's receipt of a C2D message: it holds the message durably.
#[napi(object, js_name = "C2dReceipt")]
pub struct C2dReceipt {
    /// The message id (the sender's, or one generated).
    pub message_id: String,
    /// Its sequence number in the device queue.
    pub sequence_number: f64,
}

/// One C2D feedback record: what happened to a message sent with `ack`.
#[napi(object)]
pub struct FeedbackRecord {
    /// The C2D message's id.
    pub original_message_id: String,
    /// The target device.
    pub device_id: String,
    /// The target device's generation id.
    pub device_generation_id: String,
    /// When it happened (ISO-8601 UTC).
    pub enqueued_time_utc: String,
    /// "Success", "Expired", "DeliveryCountExceeded", "Rejected" or "Purged".
    #[napi(ts_type = "'Success' | 'Expired' | 'DeliveryCountExceeded' | 'Rejected' | 'Purged'")]
    pub status: String,
    /// The status as text.
    pub description: String,
}

impl From<&CoreFeedback> for FeedbackRecord {
    fn from(r: &CoreFeedback) -> FeedbackRecord {
        FeedbackRecord {
            original_message_id: r.original_message_id.clone(),
            device_id: r.device_id.clone(),
            device_generation_id: r.device_generation_id.clone(),
            enqueued_time_utc: r.enqueued_time_utc.clone(),
            status: r.status_code.as_str().into(),
            description: r.description.clone(),
        }
    }
}

struct Inner {
    client: hubmsg_core::service::ServiceClient,
    feedback: Arc<Inbox<FeedbackSource>>,
    life: Life,
    rt: tokio::runtime::Handle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.feedback.stop_task());
        let client = self.client.clone();
        self.life.close_in_background(&self.rt, async move { client.close().await });
    }
}

/// A back-end connection to a hub: device identities, C2D commands with feedback, D2C events by
/// consumer group. Create it with `await ServiceClient.fromConnectionString(cs)` (a policy
/// connection string); close it with `await close()`.
#[napi]
pub struct ServiceClient {
    inner: Arc<Inner>,
}

fn ack_mode(s: Option<String>, default: AckMode) -> napi::Result<AckMode> {
    s.map(|s| s.parse::<AckMode>().js()).transpose().map(|a| a.unwrap_or(default))
}

impl ServiceClient {
    /// Runs a request of the client after the closed check.
    fn request<'e, T, F>(&self, env: &'e Env, f: impl FnOnce(hubmsg_core::service::ServiceClient) -> F) -> napi::Result<PromiseRaw<'e, T>>
    where
        T: napi::bindgen_prelude::ToNapiValue + Send + 'static,
        F: std::future::Future<Output = hubmsg_core::Result<T>> + Send + 'static,
    {
        self.inner.life.check().js()?;
        let fut = f(self.inner.client.clone());
        env.spawn_future(async move { fut.await.js() })
    }
}

#[napi]
impl ServiceClient {
    /// Connects (in the background) with a policy connection string
    /// (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`); resolves to the client.
    #[napi(
        configurable = true,
        ts_args_type = "connectionString: string, options?: ServiceOptions",
        ts_return_type = "Promise<ServiceClient>"
    )]
    pub fn from_connection_string<'e>(
        env: &'e Env,
        connection_string: String,
        options: Option<Checked<ServiceOptions>>,
    ) -> napi::Result<PromiseRaw<'e, ServiceClient>> {
        let mut opts = CoreOptions::from_connection_string(&connection_string).js()?;
        if let Some(Checked(o)) = options {
            opts.tls = o.ca_file.map(|f| TlsOptions { ca_file: Some(f.into()) });
            if let Some(r) = o.retry {
                opts.retry = retry_policy(r.0)?;
            }
            if let Some(t) = opt_ms(o.request_timeout_ms, "requestTimeoutMs")? {
                opts.request_timeout = t;
            }
        }
        env.spawn_future(async move {
            let client = hubmsg_core::service::ServiceClient::connect(opts).await.js()?;
            let c = client.clone();
            Ok(ServiceClient {
                inner: Arc::new(Inner {
                    client,
                    feedback: Arc::new(Inbox::lazy("feedback batches", move || Ok(FeedbackSource(c.feedback()?)))),
                    life: Life::new("service client"),
                    rt: runtime(),
                }),
            })
        })
    }

    /// The connection status ("connecting", "connected", … as `DeviceClient.status`).
    #[napi(getter, ts_return_type = "'connecting' | 'connected' | 'disconnected' | 'retrying' | 'failed' | 'closed'")]
    pub fn status(&self) -> String {
        status_name(&self.inner.client.status()).into()
    }

    /// Registers a device (generated keys unless given). Rejects with HUBMSG_ALREADY_EXISTS.
    #[napi(ts_args_type = "deviceId: string, options?: CreateDeviceOptions", ts_return_type = "Promise<DeviceIdentity>")]
    pub fn create_device<'e>(
        &self,
        env: &'e Env,
        device_id: String,
        options: Option<Checked<CreateDeviceOptions>>,
    ) -> napi::Result<PromiseRaw<'e, DeviceIdentity>> {
        let o = options.map(|o| o.0);
        let req = CreateDevice {
            device_id,
            primary_key: o.as_ref().and_then(|o| o.primary_key.clone()),
            secondary_key: o.as_ref().and_then(|o| o.secondary_key.clone()),
            status: Some(if o.and_then(|o| o.enabled).unwrap_or(true) { DeviceStatus::Enabled } else { DeviceStatus::Disabled }),
        };
        self.request(env, |c| async move { c.create_device_with(req).await.map(DeviceIdentity::from) })
    }

    /// A device's identity. Rejects with HUBMSG_NOT_FOUND.
    #[napi(ts_return_type = "Promise<DeviceIdentity>")]
    pub fn get_device<'e>(&self, env: &'e Env, device_id: String) -> napi::Result<PromiseRaw<'e, DeviceIdentity>> {
        self.request(env, |c| async move { c.get_device(&device_id).await.map(DeviceIdentity::from) })
    }

    /// Every device, ordered by id.
    #[napi(ts_return_type = "Promise<DeviceIdentity[]>")]
    pub fn list_devices<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, Vec<DeviceIdentity>>> {
        self.request(env, |c| async move { c.list_devices().await.map(|l| l.into_iter().map(DeviceIdentity::from).collect()) })
    }

    /// Deletes a device (its connection is dropped). Rejects with HUBMSG_NOT_FOUND.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn delete_device<'e>(&self, env: &'e Env, device_id: String) -> napi::Result<PromiseRaw<'e, ()>> {
        self.request(env, |c| async move { c.delete_device(&device_id).await })
    }

    /// Enables a device; resolves to its identity.
    #[napi(ts_return_type = "Promise<DeviceIdentity>")]
    pub fn enable_device<'e>(&self, env: &'e Env, device_id: String) -> napi::Result<PromiseRaw<'e, DeviceIdentity>> {
        self.request(env, |c| async move { c.set_device_status(&device_id, DeviceStatus::Enabled).await.map(DeviceIdentity::from) })
    }

    /// Disables a device (it is disconnected and refused); resolves to its identity.
    #[napi(ts_return_type = "Promise<DeviceIdentity>")]
    pub fn disable_device<'e>(&self, env: &'e Env, device_id: String) -> napi::Result<PromiseRaw<'e, DeviceIdentity>> {
        self.request(env, |c| async move { c.set_device_status(&device_id, DeviceStatus::Disabled).await.map(DeviceIdentity::from) })
    }

    /// Regenerates "primary", "secondary" or "both" (default) keys (the device is
    /// disconnected); resolves to its identity.
    #[napi(ts_args_type = "deviceId: string, which?: 'primary' | 'secondary' | 'both'", ts_return_type = "Promise<DeviceIdentity>")]
    pub fn regenerate_keys<'e>(
        &self,
        env: &'e Env,
        device_id: String,
        which: Option<String>,
    ) -> napi::Result<PromiseRaw<'e, DeviceIdentity>> {
        let which = which.unwrap_or_else(|| "both".into());
        if !["primary", "secondary", "both"].contains(&which.as_str()) {
            return Err(invalid(format!("which '{which}' is not 'primary', 'secondary' or 'both'")));
        }
        self.request(env, |c| async move { c.regenerate_keys(&device_id, &which).await.map(DeviceIdentity::from) })
    }

    /// The connection string of a registered device (primary key) on this client's hub.
    #[napi(ts_return_type = "Promise<string>")]
    pub fn device_connection_string<'e>(&self, env: &'e Env, device_id: String) -> napi::Result<PromiseRaw<'e, String>> {
        self.request(env, |c| async move {
            let d = c.get_device(&device_id).await?;
            Ok(c.device_connection_string(&d))
        })
    }

    /// Sends a C2D message; resolves once the hub holds it durably. Rejects with
    /// HUBMSG_NOT_FOUND (unknown device), HUBMSG_QUEUE_FULL (50 pending),
    /// HUBMSG_MESSAGE_TOO_LARGE (> 64 KB), HUBMSG_INVALID_ARGUMENT (TTL outside 1 s – 48 h).
    #[napi(
        js_name = "sendC2d",
        ts_args_type = "deviceId: string, body: Buffer | Uint8Array | string, options?: C2dSendOptions",
        ts_return_type = "Promise<C2dReceipt>"
    )]
    pub fn send_c2d<'e>(
        &self,
        env: &'e Env,
        device_id: String,
        body: Body,
        options: Option<Checked<C2dSendOptions>>,
    ) -> napi::Result<PromiseRaw<'e, C2dReceipt>> {
        let o = options.map(|o| o.0);
        let (ack, ttl, fields) = match o {
            Some(o) => (
                ack_mode(o.ack, AckMode::None)?,
                opt_ms(o.ttl_ms, "ttlMs")?,
                Fields {
                    properties: o.properties,
                    message_id: o.message_id,
                    correlation_id: o.correlation_id,
                    content_type: o.content_type,
                    content_encoding: o.content_encoding,
                    expiry: o.expiry,
                },
            ),
            None => (AckMode::None, None, Fields::default()),
        };
        let msg = fields.message(body)?;
        self.request(env, |c| async move {
            let r = c.send_c2d_with(&device_id, msg, C2dOptions { ack, ttl }).await?;
            Ok(C2dReceipt { message_id: r.message_id, sequence_number: r.sequence_number as f64 })
        })
    }

    /// Sends a C2D message asking for feedback (`ack`, "full" by default) and resolves to its
    /// feedback record (`status` "Success", "Rejected", "Expired", "DeliveryCountExceeded" or
    /// "Purged"). Rejects with HUBMSG_TIMEOUT after `timeoutMs` (60 s). The hub pushes the
    /// record to this client (an outcome notification), whoever else reads feedback.
    #[napi(
        js_name = "sendC2dAndWait",
        ts_args_type = "deviceId: string, body: Buffer | Uint8Array | string, options?: C2dWaitOptions",
        ts_return_type = "Promise<FeedbackRecord>"
    )]
    pub fn send_c2d_and_wait<'e>(
        &self,
        env: &'e Env,
        device_id: String,
        body: Body,
        options: Option<Checked<C2dWaitOptions>>,
    ) -> napi::Result<PromiseRaw<'e, FeedbackRecord>> {
        let o = options.map(|o| o.0);
        let (mut ack, ttl, timeout, fields) = match o {
            Some(o) => (
                ack_mode(o.ack, AckMode::Full)?,
                opt_ms(o.ttl_ms, "ttlMs")?,
                opt_ms(o.timeout_ms, "timeoutMs")?,
                Fields { properties: o.properties, message_id: o.message_id, correlation_id: o.correlation_id, ..Fields::default() },
            ),
            None => (AckMode::Full, None, None, Fields::default()),
        };
        if ack == AckMode::None {
            ack = AckMode::Full;
        }
        let timeout = timeout.unwrap_or(Duration::from_secs(60));
        let mut msg: Message = fields.message(body)?;
        let id = msg.message_id.get_or_insert_with(|| uuid::Uuid::new_v4().to_string()).clone();
        self.request(env, |c| async move {
            let rx = c.await_outcome(&id)?;
            c.send_c2d_with(&device_id, msg, C2dOptions { ack, ttl }).await?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => Ok(FeedbackRecord::from(&r)),
                Ok(Err(_)) => Err(Error::closed("service client")),
                Err(_) => Err(Error::new(ErrorKind::Timeout, format!("no feedback for message '{id}' within {timeout:?}"))),
            }
        })
    }

    /// Removes every pending C2D message of a device (feedback "Purged"); resolves to how many.
    #[napi(js_name = "purgeC2d", ts_return_type = "Promise<number>")]
    pub fn purge_c2d<'e>(&self, env: &'e Env, device_id: String) -> napi::Result<PromiseRaw<'e, f64>> {
        self.request(env, |c| async move { c.purge_c2d(&device_id).await.map(|n| n as f64) })
    }

    /// The feedback batches (`for await (const batch of svc.feedback())`); `ack()` each batch
    /// once processed, or it is delivered again.
    #[napi]
    pub fn feedback(&self) -> napi::Result<FeedbackStream> {
        self.inner.life.check().js()?;
        self.inner.feedback.start_pull(&self.inner.rt).js()?;
        Ok(FeedbackStream { inner: self.inner.clone() })
    }

    /// Opens a reader of `consumerGroup` (default "$Default"; its own connection); resolves to
    /// its `EventStream`. Readers of one group — in this process or others — share its
    /// partitions.
    #[napi(ts_args_type = "consumerGroup?: string, options?: EventsOptions", ts_return_type = "Promise<EventStream>")]
    pub fn events<'e>(
        &self,
        env: &'e Env,
        consumer_group: Option<String>,
        options: Option<Checked<EventsOptions>>,
    ) -> napi::Result<PromiseRaw<'e, EventStream>> {
        let group = consumer_group.unwrap_or_else(|| "$Default".into());
        if group.is_empty() {
            return Err(invalid("consumerGroup is empty (the default group is '$Default')"));
        }
        let from = options.and_then(|o| o.0.from).map(|s| s.0).unwrap_or(StartPosition::Checkpoint);
        self.inner.life.check().js()?;
        let (c, rt) = (self.inner.client.clone(), self.inner.rt.clone());
        env.spawn_future(async move {
            let stream = c.events(&group, from).await.js()?;
            let (source, ctl) = EventsSource::new(stream);
            let inbox = Arc::new(Inbox::lazy("events", move || Ok(source)));
            inbox.start_pull(&rt).js()?;
            Ok(EventStream { inner: Arc::new(EventsInner { inbox, ctl, life: Life::new("event stream"), rt }) })
        })
    }

    /// Closes the client; pending requests reject with HUBMSG_CLOSED and feedback iterations
    /// end. Idempotent.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, ()>> {
        let first = self.inner.life.close();
        let inner = self.inner.clone();
        env.spawn_future(async move {
            if first {
                inner.client.close().await;
                if let Some(pump) = inner.feedback.stop_task() {
                    let _ = pump.await;
                }
            }
            Ok(())
        })
    }
}

/// A batch of feedback records; `ack()` it once processed, or it is delivered again.
#[napi]
pub struct FeedbackBatch {
    batch: CoreBatch,
}

#[napi]
impl FeedbackBatch {
    /// The batch id.
    #[napi(getter)]
    pub fn id(&self) -> f64 {
        self.batch.id as f64
    }

    /// The records.
    #[napi(getter)]
    pub fn records(&self) -> Vec<FeedbackRecord> {
        self.batch.records.iter().map(FeedbackRecord::from).collect()
    }

    /// Acknowledges the batch (the hub deletes it).
    #[napi]
    pub fn ack(&self) {
        self.batch.ack();
    }
}

/// Feedback batches (`ServiceClient.feedback()`): `next(timeoutMs)` or `for await`.
#[napi]
pub struct FeedbackStream {
    inner: Arc<Inner>,
}

#[napi]
impl FeedbackStream {
    /// The next batch within `timeoutMs` (default: until one arrives); null on timeout or once
    /// the client is closed.
    #[napi(ts_return_type = "Promise<FeedbackBatch | null>")]
    pub fn next<'e>(&self, env: &'e Env, timeout_ms: Option<f64>) -> napi::Result<PromiseRaw<'e, Option<FeedbackBatch>>> {
        let timeout = opt_ms(timeout_ms, "timeoutMs")?;
        if self.inner.life.is_closed() {
            return env.spawn_future(async { Ok(None) });
        }
        let next = self.inner.feedback.next(&self.inner.rt, timeout);
        env.spawn_future(async move { Ok(end_is_none(next.await)?.map(|batch| FeedbackBatch { batch })) })
    }
}

struct EventsInner {
    inbox: Arc<Inbox<EventsSource>>,
    ctl: EventsControl,
    life: Life,
    rt: tokio::runtime::Handle,
}

impl Drop for EventsInner {
    fn drop(&mut self) {
        drop(self.inbox.stop_task());
        let ctl = self.ctl.clone();
        self.life.close_in_background(&self.rt, async move { ctl.close().await });
    }
}

/// A consumer-group reader of D2C events: `for await (const ev of stream)` or
/// `next(timeoutMs)`. `ack()` each event once processed (unacknowledged ones are delivered
/// again after a reconnect, and hold back delivery: at most 1,000 per partition and 8 MiB are
/// outstanding);
/// `checkpoint()` makes the acknowledged position durable. `close()` leaves the group.
#[napi]
pub struct EventStream {
    inner: Arc<EventsInner>,
}

#[napi]
impl EventStream {
    /// The next event within `timeoutMs` (default: until one arrives); null on timeout or
    /// once the stream is closed.
    #[napi(ts_return_type = "Promise<Event | null>")]
    pub fn next<'e>(&self, env: &'e Env, timeout_ms: Option<f64>) -> napi::Result<PromiseRaw<'e, Option<Event>>> {
        let timeout = opt_ms(timeout_ms, "timeoutMs")?;
        if self.inner.life.is_closed() {
            return env.spawn_future(async { Ok(None) });
        }
        let next = self.inner.inbox.next(&self.inner.rt, timeout);
        env.spawn_future(async move { Ok(end_is_none(next.await)?.map(Event::new)) })
    }

    /// Up to `max` events (default 100, at most 10,000; and at most 4 MiB of bodies unless one
    /// event alone is larger): waits up to `timeoutMs` (default: until one arrives) for the
    /// first, then takes those already received, without waiting again — one Promise for many
    /// events when they arrive fast. An empty array on timeout; null once the stream is closed.
    /// `ack()` each as an event from `next()`; the async iterator reads this way.
    #[napi(ts_args_type = "max?: number, timeoutMs?: number", ts_return_type = "Promise<Event[] | null>")]
    pub fn next_batch<'e>(
        &self,
        env: &'e Env,
        max: Option<f64>,
        timeout_ms: Option<f64>,
    ) -> napi::Result<PromiseRaw<'e, Option<EventBatch>>> {
        let limits = crate::batch_limits(max, |ev: &CoreEvent| ev.body().len())?;
        let timeout = opt_ms(timeout_ms, "timeoutMs")?;
        if self.inner.life.is_closed() {
            return env.spawn_future(async { Ok(None) });
        }
        let next = self.inner.inbox.next_batch(&self.inner.rt, limits, timeout);
        env.spawn_future(
            async move { Ok(end_is_none(next.await.map(Some))?.map(|b| External::new(b.into_iter().map(Arc::new).collect()))) },
        )
    }

    /// Events received from the hub that no `next()` took yet (bounded by the hub's window of
    /// unacknowledged events: 1,000 per partition, 8 MiB).
    #[napi(getter)]
    pub fn buffered(&self) -> u32 {
        self.inner.inbox.buffered() as u32
    }

    /// Whether `close()` was called.
    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.inner.life.is_closed()
    }

    /// Asks the hub to persist the group's checkpoints (the acknowledged position); resolves
    /// once they are durable.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn checkpoint<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, ()>> {
        self.inner.life.check().js()?;
        let ctl = self.inner.ctl.clone();
        env.spawn_future(async move { ctl.checkpoint().await.js() })
    }

    /// Leaves the group (its partitions move to the other readers) and ends the stream:
    /// pending `next()` calls resolve to null. Idempotent.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, ()>> {
        let first = self.inner.life.close();
        let inner = self.inner.clone();
        env.spawn_future(async move {
            if first {
                let _ = tokio::time::timeout(Duration::from_secs(10), inner.ctl.close()).await;
                if let Some(pump) = inner.inbox.stop_task() {
                    let _ = pump.await;
                }
            }
            Ok(())
        })
    }
}

/// One D2C event: the device's message with the hub's system properties, where it is in the
/// log (`partition`, `sequenceNumber`), and `ack()`.
#[napi]
pub struct Event {
    event: Arc<CoreEvent>,
}

impl Event {
    fn new(event: CoreEvent) -> Event {
        Event { event: Arc::new(event) }
    }
}

/// The events of one `nextBatch` (an opaque value in JS): the JS layer hands out an `Event` per
/// event whose `messageId` reads the batch's id column (`_eventMessageIdColumn`, one call), whose
/// `ack()`s of one tick go in one `_eventAckMany` call, and whose other members read a native
/// `Event` made on first use (`_eventAt`) — a native object per event, or a napi call per event,
/// cost more than the engine's own work for it.
type EventBatch = External<Vec<Arc<CoreEvent>>>;

fn event_at(batch: &EventBatch, index: u32) -> napi::Result<&Arc<CoreEvent>> {
    batch.get(index as usize).ok_or_else(|| invalid(format!("no event {index} in a batch of {}", batch.len())))
}

/// The number of events of a `nextBatch` batch. Not part of the API (the JS layer's).
#[napi(js_name = "_eventLength", skip_typescript)]
pub fn event_length(batch: &EventBatch) -> u32 {
    batch.len() as u32
}

/// Event `index` of a `nextBatch` batch as a native `Event`. Not part of the API.
#[napi(js_name = "_eventAt", skip_typescript)]
pub fn event_in_batch(batch: &EventBatch, index: u32) -> napi::Result<Event> {
    Ok(Event { event: event_at(batch, index)?.clone() })
}

/// `Event.messageId` of event `index` of a `nextBatch` batch. Not part of the API.
#[napi(js_name = "_eventMessageId", skip_typescript)]
pub fn event_message_id(batch: &EventBatch, index: u32) -> napi::Result<Option<String>> {
    Ok(event_at(batch, index)?.message_id().map(str::to_string))
}

/// `Event.messageId` of every event of a `nextBatch` batch, in order (one call for the batch).
/// Not part of the API.
#[napi(js_name = "_eventMessageIdColumn", skip_typescript)]
pub fn event_message_id_column(batch: &EventBatch) -> Vec<Option<String>> {
    batch.iter().map(|e| e.message_id().map(str::to_string)).collect()
}

/// `Event.ack()` of the events `indices` of a `nextBatch` batch (one call for the acks of a
/// tick). Not part of the API.
#[napi(js_name = "_eventAckMany", skip_typescript)]
pub fn event_ack_many(batch: &EventBatch, indices: &[u32]) -> napi::Result<()> {
    for &i in indices {
        event_at(batch, i)?.ack();
    }
    Ok(())
}

impl Received for Event {
    fn msg(&self) -> &Message {
        self.event.message()
    }

    fn body_bytes(&self) -> bytes::Bytes {
        self.event.body()
    }

    fn mid(&self) -> Option<&str> {
        self.event.message_id()
    }
}

message_getters!(Event);

#[napi]
impl Event {
    /// The sending device.
    #[napi(getter)]
    pub fn device_id(&self) -> String {
        self.event.device_id().to_string()
    }

    /// The partition it came from.
    #[napi(getter)]
    pub fn partition(&self) -> u32 {
        self.event.partition
    }

    /// Its sequence number within the partition.
    #[napi(getter)]
    pub fn sequence_number(&self) -> f64 {
        self.event.sequence_number as f64
    }

    /// When the hub stored it, ms since the Unix epoch.
    #[napi(getter)]
    pub fn enqueued_time_ms(&self) -> f64 {
        self.event.enqueued_time_ms() as f64
    }

    /// When the hub stored it.
    #[napi(getter, ts_return_type = "Date")]
    pub fn enqueued_time(&self) -> JsDate {
        JsDate(self.event.enqueued_time_ms())
    }

    /// Acknowledges it: the group's checkpoint moves past it once every earlier event of its
    /// partition is acknowledged too.
    #[napi]
    pub fn ack(&self) {
        self.event.ack();
    }
}
