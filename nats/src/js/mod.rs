//! The JetStream implementation of [`crate::backend::Backend`] (mapping and gaps:
//! `docs/scale-out.md`).
//!
//! Invariants: [`NatsBackend::connect`] refuses a server older than 2.11, one with JetStream
//! off, and one that ignores per-message TTL, before creating anything; every stream and bucket
//! is created idempotently with the configured replicas, so any number of hub nodes can start
//! against the same cluster; the partition count is fixed by the first node that starts.

mod c2d;
mod events;
mod registry;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, message::PublishMessage, stream};
use async_nats::HeaderMap;
use bytes::Bytes;

use hubmsg_core::hub::c2d::C2dLimits;
use hubmsg_core::{Error, ErrorKind, Result};

use crate::backend::{self, BoxFut};
use crate::names;

/// Settings of the JetStream backend.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URLs, comma separated: `nats://127.0.0.1:4222,nats://127.0.0.1:4223`.
    pub urls: String,
    /// This hub node's id (unique among the nodes; default a random UUID).
    pub node: String,
    /// D2C partitions when this cluster has none yet (later nodes use the existing count).
    pub partitions: u32,
    /// Replicas of every stream, bucket and durable consumer (3 for a 3-node cluster).
    pub replicas: usize,
    /// D2C retention by age (default 1 day).
    pub d2c_max_age: Duration,
    /// D2C retention by size per partition (default 10 GiB).
    pub d2c_max_bytes: i64,
    /// Window in which a D2C message id is de-duplicated (default 10 min).
    pub duplicate_window: Duration,
    /// C2D limits (depth 50, lock 60 s, max delivery 10, TTL 1 h / 48 h, 64 KB, batch 64).
    pub c2d: C2dLimits,
    /// Lease of group members, partition owners and the sweeper (default 10 s): a dead node's
    /// partitions move after about this long.
    pub lease_ttl: Duration,
    /// Feedback records older than this are dropped by the stream (default 1 h, IoT Hub's).
    pub feedback_ttl: Duration,
    /// How long an append or enqueue retries through a leader failover (default 30 s).
    pub append_timeout: Duration,
    /// Timeout of one JetStream API request or publish ack (default 5 s).
    pub request_timeout: Duration,
}

impl NatsConfig {
    /// Defaults for a cluster at `urls`.
    pub fn new(urls: impl Into<String>) -> NatsConfig {
        NatsConfig {
            urls: urls.into(),
            node: uuid::Uuid::new_v4().to_string(),
            partitions: 4,
            replicas: 3,
            d2c_max_age: Duration::from_secs(86_400),
            d2c_max_bytes: 10 * 1024 * 1024 * 1024,
            duplicate_window: Duration::from_secs(600),
            c2d: C2dLimits::default(),
            lease_ttl: Duration::from_secs(10),
            feedback_ttl: Duration::from_secs(3600),
            append_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Makes a [`NatsBackend`] for a hub (`HubConfig::backend`): the cluster at `urls`, with the
/// hub's partitions, C2D limits, retention and feedback settings.
#[derive(Debug, Clone)]
pub struct NatsConnector {
    /// Settings other than the ones taken from the hub's configuration.
    pub config: NatsConfig,
}

impl NatsConnector {
    /// A connector for the cluster at `urls` (`nats://HOST:PORT[,…]`), defaults otherwise.
    pub fn new(urls: impl Into<String>) -> NatsConnector {
        NatsConnector { config: NatsConfig::new(urls) }
    }
}

impl backend::BackendConnector for NatsConnector {
    fn connect<'a>(&'a self, hub: &'a hubmsg_core::hub::HubConfig) -> BoxFut<'a, Arc<dyn backend::Backend>> {
        Box::pin(async move {
            let mut cfg = self.config.clone();
            cfg.partitions = hub.partitions;
            cfg.c2d = hub.c2d.clone();
            cfg.d2c_max_age = hub.retention_age;
            cfg.d2c_max_bytes = hub.retention_bytes.min(i64::MAX as u64) as i64;
            cfg.feedback_ttl = hub.feedback_ttl;
            Ok(Arc::new(NatsBackend::connect(cfg).await?) as Arc<dyn backend::Backend>)
        })
    }
}

/// Bucket names.
const META: &str = "hubmsg_meta";
const REGISTRY: &str = "hubmsg_registry";
const SESSIONS: &str = "hubmsg_sessions";
const LEASES: &str = "hubmsg_groups";
const C2D_STATE: &str = "hubmsg_c2d";
const COUNTERS: &str = "hubmsg_counters";

/// What every part shares.
pub(crate) struct Inner {
    pub(crate) cfg: NatsConfig,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) partitions: u32,
    pub(crate) registry: kv::Store,
    pub(crate) sessions: kv::Store,
    pub(crate) leases: kv::Store,
    pub(crate) c2d_state: kv::Store,
    pub(crate) counters: kv::Store,
    pub(crate) tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Where this node reports the outcomes it hears on [`names::OUTCOMES_SUBJECT`] (set by the
    /// hub, `Feedback::on_outcome`).
    pub(crate) outcome_sink: Arc<parking_lot::Mutex<Option<backend::OutcomeSink>>>,
}

/// The JetStream backend of one hub node.
pub struct NatsBackend {
    inner: Arc<Inner>,
    events: events::NatsEvents,
    groups: events::NatsGroups,
    c2d: c2d::NatsC2d,
    feedback: c2d::NatsFeedback,
    registry: registry::NatsRegistry,
    sessions: registry::NatsSessions,
    counters: registry::NatsCounters,
}

/// A JetStream failure as a hubmsg error (transient `Storage`: the caller may retry).
pub(crate) fn js_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Storage, format!("JetStream {what} failed: {e}; check that the NATS cluster is reachable and has a leader"))
}

/// The JetStream API error code in an error's source chain (e.g. 10077, 10071).
pub(crate) fn js_code(e: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(j) = err.downcast_ref::<jetstream::Error>() {
            return Some(j.error_code().0);
        }
        cur = err.source();
    }
    None
}

/// JetStream's "maximum messages per subject exceeded" (discard new per subject).
pub(crate) const MAX_MSGS_PER_SUBJECT: u64 = 10077;

/// Publishes a message and returns its ack future once submitted (submission order = stream
/// order for one connection).
pub(crate) async fn submit(
    js: &jetstream::Context,
    subject: &str,
    headers: &HeaderMap,
    payload: &Bytes,
) -> std::result::Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
    js.send_publish(subject.to_string(), PublishMessage::build().headers(headers.clone()).payload(payload.clone())).await
}

/// Awaits a publish ack, re-publishing the same message (same `Nats-Msg-Id`, so a copy that was
/// stored is de-duplicated) while the stream has no leader, until `deadline`.
pub(crate) async fn await_ack(
    js: &jetstream::Context,
    subject: &str,
    headers: &HeaderMap,
    payload: &Bytes,
    first: std::result::Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>,
    deadline: tokio::time::Instant,
) -> std::result::Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    use jetstream::context::PublishErrorKind as K;
    let mut attempt = first;
    let mut started = tokio::time::Instant::now();
    let mut retries = 0u32;
    loop {
        let r = match attempt {
            Ok(fut) => fut.await,
            Err(e) => Err(e),
        };
        match r {
            Ok(ack) => return Ok(ack),
            Err(e) => {
                let permanent = matches!(e.kind(), K::MaxPayloadExceeded | K::WrongLastSequence | K::WrongLastMessageId)
                    || js_code(&e) == Some(MAX_MSGS_PER_SUBJECT);
                if permanent || tokio::time::Instant::now() >= deadline {
                    return Err(e);
                }
                tracing::debug!(subject, error = %e, "publish not acknowledged; retrying with the same message id");
                // The first retry goes at once (a copy lost with a dead leader, or a broken
                // connection); later ones are paced (no responders while a leader is elected),
                // except after a timeout, which already waited.
                if retries > 0 {
                    tokio::time::sleep_until(started + Duration::from_millis(250)).await;
                }
                retries += 1;
                started = tokio::time::Instant::now();
                attempt = submit(js, subject, headers, payload).await;
            }
        }
    }
}

/// Puts a KV value with a per-key TTL, optionally only if the key's last revision is `expect`
/// (0 = the key must not exist). Returns the new revision.
pub(crate) async fn kv_put_ttl(
    js: &jetstream::Context,
    bucket: &str,
    key: &str,
    value: Bytes,
    ttl: Duration,
    expect: Option<u64>,
) -> std::result::Result<u64, jetstream::context::PublishError> {
    let mut h = HeaderMap::new();
    h.insert("Nats-TTL", format!("{}s", ttl.as_secs().max(1)).as_str());
    if let Some(rev) = expect {
        h.insert("Nats-Expected-Last-Subject-Sequence", rev.to_string().as_str());
    }
    let ack = js.send_publish(format!("$KV.{bucket}.{key}"), PublishMessage::build().headers(h).payload(value)).await?.await?;
    Ok(ack.sequence)
}

/// A continuous pull from `consumer` (pull requests of `batch`, idle heartbeats): messages stay
/// buffered in the client until taken, so dropping a half-read result loses nothing.
pub(crate) async fn pull_messages(
    consumer: &jetstream::consumer::PullConsumer,
    batch: usize,
    what: &str,
) -> Result<jetstream::consumer::pull::Stream> {
    consumer
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| js_err(what, e))
}

/// Runs a setup request until it succeeds or `deadline` passes (returning the last error).
async fn retry_setup<T, E: std::fmt::Display, F: std::future::Future<Output = std::result::Result<T, E>>>(
    deadline: tokio::time::Instant,
    mut f: impl FnMut() -> F,
) -> std::result::Result<T, E> {
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "JetStream setup request failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether a KV write failed because another writer got there first.
pub(crate) fn is_conflict(e: &(dyn std::error::Error + 'static)) -> bool {
    js_code(e) == Some(10071) || e.to_string().contains("wrong last sequence")
}

impl NatsBackend {
    /// Connects to the cluster, checks the server (2.11+, JetStream on, per-message TTL
    /// honoured), and creates whatever streams, buckets and default policies are missing.
    pub async fn connect(cfg: NatsConfig) -> Result<NatsBackend> {
        let addrs: Vec<async_nats::ServerAddr> = cfg
            .urls
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>().map_err(|e| Error::invalid(format!("NATS URL '{u}': {e}"))))
            .collect::<Result<_>>()?;
        if addrs.is_empty() {
            return Err(Error::invalid("no NATS URL given (expected nats://HOST:PORT[,…])"));
        }
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(cfg.request_timeout)
            .request_timeout(Some(cfg.request_timeout))
            .name(format!("hubmsg-hub/{}", cfg.node))
            .connect(addrs)
            .await
            .map_err(|e| Error::new(ErrorKind::Disconnected, format!("cannot connect to NATS at {}: {e}", cfg.urls)).with_source(e))?;
        let info = client.server_info();
        names::check_server(&cfg.urls, &info.version, info.jetstream)?;
        // No client-side bound on publish acks in flight (async-nats's default is 5,000 per
        // context, waited for at submission): a device session keeps its append tickets and
        // resolves them in order, so a submission that waits for a permit blocks the very session
        // whose unpolled tickets hold the permits — with every session of a node doing that, D2C
        // and every KV write of the node stalled for good. What is in flight is bounded by the
        // hub itself (`session_pending_messages` / `_bytes` per session, `hub_pending_bytes`);
        // every other publish (KV, C2D, feedback) awaits its ack at once.
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.request_timeout)
            .max_ack_inflight(tokio::sync::Semaphore::MAX_PERMITS)
            .build(client.clone());
        let setup_deadline = tokio::time::Instant::now() + cfg.append_timeout;
        retry_setup(setup_deadline, || js.query_account()).await.map_err(|e| {
            Error::invalid(format!(
                "NATS server at {} (version {}) does not answer JetStream requests ({e}); enable JetStream (-js) and check the account",
                cfg.urls, info.version
            ))
        })?;
        let r = cfg.replicas;
        let bucket = |name: &str, max_age: Duration, ttl: bool| kv::Config {
            bucket: name.to_string(),
            history: 1,
            num_replicas: r,
            max_age,
            limit_markers: ttl.then_some(Duration::from_secs(1)),
            ..Default::default()
        };
        // A cluster that just elected its meta leader may still time out placing R3 assets:
        // setup retries until `append_timeout`.
        let create = |c: kv::Config| {
            let js = js.clone();
            async move {
                let name = c.bucket.clone();
                retry_setup(setup_deadline, || js.create_or_update_key_value(c.clone()))
                    .await
                    .map_err(|e| js_err(&format!("creating bucket {name}"), e))
            }
        };
        let meta = create(bucket(META, Duration::ZERO, false)).await?;
        let registry = create(bucket(REGISTRY, Duration::ZERO, false)).await?;
        let sessions = create(bucket(SESSIONS, Duration::ZERO, false)).await?;
        let leases = create(bucket(LEASES, Duration::ZERO, true)).await?;
        let c2d_state = create(bucket(C2D_STATE, cfg.c2d.max_ttl + Duration::from_secs(3600), false)).await?;
        let counters = create(bucket(COUNTERS, Duration::ZERO, false)).await?;
        // Per-message TTL must be honoured (2.9 silently ignores it): the leases depend on it.
        let lease_info = retry_setup(setup_deadline, || async {
            js.get_stream(format!("KV_{LEASES}"))
                .await
                .map_err(|e| js_err("reading the lease bucket", e))?
                .get_info()
                .await
                .map_err(|e| js_err("reading the lease bucket", e))
        })
        .await?;
        if !lease_info.config.allow_message_ttl {
            return Err(Error::invalid(format!(
                "NATS server at {} (version {}) ignores per-message TTL (allow_msg_ttl); hubmsg needs 2.11 or later",
                cfg.urls, info.version
            )));
        }
        // The partition count is fixed by the first node.
        if cfg.partitions == 0 || cfg.partitions > 128 {
            return Err(Error::invalid("partitions must be between 1 and 128"));
        }
        // Like every setup request, retried until `append_timeout` while the cluster cannot
        // answer yet (a bucket just created may have no leader: "503 no responders"); a
        // malformed stored count is not retried.
        let stored = retry_setup(setup_deadline, || async {
            match meta.create("partitions", cfg.partitions.to_string().into()).await {
                Ok(_) => Ok(None),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    meta.get("partitions").await.map(|v| Some(v.unwrap_or_default())).map_err(|e| js_err("reading the partition count", e))
                }
                Err(e) => Err(js_err("recording the partition count", e)),
            }
        })
        .await?;
        let partitions = match stored {
            None => cfg.partitions,
            Some(v) => {
                let n: u32 = std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Storage,
                        format!("bucket {META} holds a malformed partition count {:?}", String::from_utf8_lossy(&v)),
                    )
                })?;
                if n != cfg.partitions {
                    tracing::warn!(
                        existing = n,
                        requested = cfg.partitions,
                        "partition count is fixed at creation; using the existing one"
                    );
                }
                n
            }
        };
        let make = |c: stream::Config| {
            let js = js.clone();
            async move {
                let name = c.name.clone();
                retry_setup(setup_deadline, || js.create_or_update_stream(c.clone()))
                    .await
                    .map_err(|e| js_err(&format!("creating stream {name}"), e))
            }
        };
        for p in 0..partitions {
            make(stream::Config {
                name: names::d2c_stream(p),
                subjects: vec![format!("hubmsg.d2c.{p}.>")],
                retention: stream::RetentionPolicy::Limits,
                num_replicas: r,
                max_age: cfg.d2c_max_age,
                max_bytes: cfg.d2c_max_bytes,
                duplicate_window: cfg.duplicate_window,
                max_message_size: (hubmsg_core::message::MAX_D2C_SIZE + 64 * 1024) as i32,
                allow_direct: true,
                ..Default::default()
            })
            .await?;
        }
        make(stream::Config {
            name: names::C2D_STREAM.into(),
            subjects: vec!["hubmsg.c2d.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            num_replicas: r,
            max_messages_per_subject: cfg.c2d.max_queue as i64,
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            // A backstop only: the sweeper expires messages with feedback first.
            max_age: cfg.c2d.max_ttl + Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(120),
            max_message_size: (cfg.c2d.max_size + 64 * 1024) as i32,
            ..Default::default()
        })
        .await?;
        make(stream::Config {
            name: names::FEEDBACK_STREAM.into(),
            subjects: vec![names::FEEDBACK_SUBJECT.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            num_replicas: r,
            max_age: cfg.feedback_ttl,
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await?;
        let inner = Arc::new(Inner {
            cfg,
            client,
            js,
            partitions,
            registry,
            sessions,
            leases,
            c2d_state,
            counters,
            tasks: parking_lot::Mutex::new(Vec::new()),
            outcome_sink: Arc::new(parking_lot::Mutex::new(None)),
        });
        // Every node hears every outcome (its own too), subscribed before it serves anyone.
        let outcomes = inner.client.subscribe(names::OUTCOMES_SUBJECT).await.map_err(|e| js_err("subscribing to outcomes", e))?;
        inner.tasks.lock().push(tokio::spawn(c2d::relay_outcomes(outcomes, inner.outcome_sink.clone())));
        let feedback = c2d::NatsFeedback::open(inner.clone()).await?;
        let registry = registry::NatsRegistry::open(inner.clone()).await?;
        let sessions = registry::NatsSessions::open(inner.clone()).await?;
        Ok(NatsBackend {
            events: events::NatsEvents { inner: inner.clone() },
            groups: events::NatsGroups { inner: inner.clone() },
            c2d: c2d::NatsC2d::new(inner.clone()),
            feedback,
            registry,
            sessions,
            counters: registry::NatsCounters { inner: inner.clone() },
            inner,
        })
    }

    /// The partition count in force.
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.inner.cfg.node
    }

    /// The JetStream context (for inspection in tests and tools).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }
}

impl backend::Backend for NatsBackend {
    fn kind(&self) -> &'static str {
        "nats"
    }
    fn ready(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if self.inner.client.connection_state() != async_nats::connection::State::Connected {
                return Err(Error::new(ErrorKind::Disconnected, format!("not connected to NATS at {}", self.inner.cfg.urls)));
            }
            self.inner.js.query_account().await.map_err(|e| js_err("answering an account query", e))?;
            Ok(())
        })
    }
    fn events(&self) -> &dyn backend::EventLog {
        &self.events
    }
    fn groups(&self) -> &dyn backend::ConsumerGroups {
        &self.groups
    }
    fn c2d(&self) -> &dyn backend::C2dQueues {
        &self.c2d
    }
    fn feedback(&self) -> &dyn backend::Feedback {
        &self.feedback
    }
    fn registry(&self) -> &dyn backend::RegistryStore {
        &self.registry
    }
    fn sessions(&self) -> &dyn backend::Sessions {
        &self.sessions
    }
    fn counters(&self) -> &dyn backend::Counters {
        &self.counters
    }
    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            for t in self.inner.tasks.lock().drain(..) {
                t.abort();
            }
            self.c2d.release_sweeper().await;
            self.inner.client.flush().await.map_err(|e| js_err("flushing on close", e))?;
            Ok(())
        })
    }
}

impl Drop for NatsBackend {
    fn drop(&mut self) {
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
    }
}
