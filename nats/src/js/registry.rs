//! Registry, sessions and counters in JetStream KV.
//!
//! Invariants: a device is created with `create` (fails if the key exists) and changed only by
//! compare-and-swap on its revision, so concurrent updates on different nodes never lose one;
//! every node watches the registry (cache for listing, [`RegistryChange`]s for kicking) and the
//! session claims (a claim with a higher revision than a local one ends the local session).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use hubmsg_core::hub::registry;
use hubmsg_core::hub::Policy;
use hubmsg_core::proto::{CreateDevice, DeviceIdentity, DeviceStatus};
use hubmsg_core::{Error, ErrorKind, Result};

use super::{is_conflict, js_err, Inner};
use crate::backend::{BoxFut, Counters, LocalClaims, RegistryChange, RegistryStore, SessionClaim, Sessions};
use crate::names;

/// Attempts of a compare-and-swap loop before giving up.
const CAS_TRIES: usize = 32;

use registry::not_found;

pub(crate) struct NatsRegistry {
    inner: Arc<Inner>,
    cache: Arc<Mutex<BTreeMap<String, DeviceIdentity>>>,
    /// Revision of the last registry entry the watcher applied.
    seen: watch::Receiver<u64>,
    changes: broadcast::Sender<RegistryChange>,
}

impl NatsRegistry {
    pub(crate) async fn open(inner: Arc<Inner>) -> Result<NatsRegistry> {
        // Created once by the first node; later nodes keep the cluster's keys.
        for p in registry::default_policies() {
            match inner.registry.create(names::policy_key(&p.name), Bytes::from(serde_json::to_vec(&p).expect("policy serializes"))).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(js_err("creating the default policies", e)),
            }
        }
        let cache = Arc::new(Mutex::new(BTreeMap::new()));
        let (seen_tx, seen) = watch::channel(0u64);
        let (changes, _) = broadcast::channel(1024);
        // Devices from their history (the cache), policies from now on (key regenerations).
        let devices = inner.registry.watch_with_history("d.>").await.map_err(|e| js_err("watching the registry", e))?;
        let policies = inner.registry.watch("p.>").await.map_err(|e| js_err("watching the policies", e))?;
        let mut w = futures_util::stream::select(devices, policies);
        let (c, tx) = (cache.clone(), changes.clone());
        let task = tokio::spawn(async move {
            while let Some(e) = w.next().await {
                let e = match e {
                    Ok(e) => e,
                    Err(err) => {
                        tracing::warn!(error = %err, "registry watch error");
                        continue;
                    }
                };
                if e.key.starts_with("p.") {
                    if e.operation == Operation::Put {
                        if let Ok(p) = serde_json::from_slice::<Policy>(&e.value) {
                            let _ = tx.send(RegistryChange::Policy(p));
                        }
                    }
                } else if let Ok(id) = names::untoken(e.key.trim_start_matches("d.")) {
                    apply_device(&c, &tx, id, &e);
                }
                seen_tx.send_if_modified(|s| {
                    let moved = e.revision > *s;
                    *s = (*s).max(e.revision);
                    moved
                });
            }
        });
        inner.tasks.lock().push(task);
        Ok(NatsRegistry { inner, cache, seen, changes })
    }

    async fn entry(&self, id: &str) -> Result<Option<(DeviceIdentity, u64)>> {
        match self.inner.registry.entry(names::device_key(id)).await.map_err(|e| js_err("reading the registry", e))? {
            Some(e) if e.operation == Operation::Put => {
                let d = serde_json::from_slice(&e.value)
                    .map_err(|err| Error::new(ErrorKind::Storage, format!("corrupt registry entry '{id}': {err}")))?;
                Ok(Some((d, e.revision)))
            }
            _ => Ok(None),
        }
    }
}

/// Applies one device entry of the registry watch to the cache and tells the node.
fn apply_device(cache: &Mutex<BTreeMap<String, DeviceIdentity>>, changes: &broadcast::Sender<RegistryChange>, id: String, e: &kv::Entry) {
    match e.operation {
        Operation::Put => {
            if let Ok(d) = serde_json::from_slice::<DeviceIdentity>(&e.value) {
                cache.lock().insert(id, d.clone());
                let _ = changes.send(RegistryChange::Put(d));
            }
        }
        Operation::Delete | Operation::Purge => {
            cache.lock().remove(&id);
            let _ = changes.send(RegistryChange::Deleted(id));
        }
    }
}

impl RegistryStore for NatsRegistry {
    fn device<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<DeviceIdentity>> {
        Box::pin(async move { Ok(self.entry(id).await?.map(|(d, _)| d)) })
    }

    fn devices(&self) -> BoxFut<'_, Vec<DeviceIdentity>> {
        Box::pin(async move {
            // Read-your-writes: wait until the watcher applied everything stored so far.
            let last = self.inner.js.get_stream("KV_hubmsg_registry").await.map_err(|e| js_err("reading the registry", e))?;
            let last = last.cached_info().state.last_sequence;
            let mut seen = self.seen.clone();
            let _ = tokio::time::timeout(Duration::from_secs(5), seen.wait_for(|s| *s >= last || last == 0)).await;
            Ok(self.cache.lock().values().cloned().collect())
        })
    }

    fn create(&self, req: CreateDevice) -> BoxFut<'_, DeviceIdentity> {
        Box::pin(async move {
            registry::validate_create(&req)?;
            let dev = registry::new_identity(&req);
            let body = Bytes::from(serde_json::to_vec(&dev).expect("identity serializes"));
            match self.inner.registry.create(names::device_key(&dev.device_id), body).await {
                Ok(_) => Ok(dev),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(registry::already_exists(&req.device_id)),
                Err(e) => Err(js_err("creating a device", e)),
            }
        })
    }

    fn update<'a>(&'a self, id: &'a str, status: Option<DeviceStatus>, regenerate: Option<&'a str>) -> BoxFut<'a, DeviceIdentity> {
        Box::pin(async move {
            for _ in 0..CAS_TRIES {
                let (mut dev, rev) = self.entry(id).await?.ok_or_else(|| not_found(id))?;
                registry::apply_update(&mut dev, status, regenerate)?;
                let body = Bytes::from(serde_json::to_vec(&dev).expect("identity serializes"));
                match self.inner.registry.update(names::device_key(id), body, rev).await {
                    Ok(_) => return Ok(dev),
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(js_err("updating a device", e)),
                }
            }
            Err(Error::new(ErrorKind::Storage, format!("device '{id}' kept changing under concurrent updates; try again")))
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            for _ in 0..CAS_TRIES {
                let (_, rev) = self.entry(id).await?.ok_or_else(|| not_found(id))?;
                match self.inner.registry.delete_expect_revision(names::device_key(id), Some(rev)).await {
                    Ok(()) => return Ok(()),
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(js_err("deleting a device", e)),
                }
            }
            Err(Error::new(ErrorKind::Storage, format!("device '{id}' kept changing under concurrent updates; try again")))
        })
    }

    fn policy<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<Policy>> {
        Box::pin(async move {
            let v = self.inner.registry.get(names::policy_key(name)).await.map_err(|e| js_err("reading a policy", e))?;
            v.map(|b| serde_json::from_slice(&b).map_err(|e| Error::new(ErrorKind::Storage, format!("corrupt policy '{name}': {e}"))))
                .transpose()
        })
    }

    fn policies(&self) -> BoxFut<'_, Vec<Policy>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for p in registry::default_policies() {
                if let Some(p) = self.policy(&p.name).await? {
                    out.push(p);
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }

    fn regenerate_policy<'a>(&'a self, name: &'a str, which: &'a str) -> BoxFut<'a, Policy> {
        Box::pin(async move {
            let key = names::policy_key(name);
            for _ in 0..CAS_TRIES {
                let entry = self.inner.registry.entry(&key).await.map_err(|e| js_err("reading a policy", e))?;
                let Some(e) = entry.filter(|e| e.operation == Operation::Put) else { return Err(registry::no_policy(name)) };
                let mut p: Policy = serde_json::from_slice(&e.value)
                    .map_err(|err| Error::new(ErrorKind::Storage, format!("corrupt policy '{name}': {err}")))?;
                registry::regenerate(&mut p.primary_key, &mut p.secondary_key, which)?;
                let body = Bytes::from(serde_json::to_vec(&p).expect("policy serializes"));
                match self.inner.registry.update(&key, body, e.revision).await {
                    Ok(_) => return Ok(p),
                    Err(err) if is_conflict(&err) => continue,
                    Err(err) => return Err(js_err("regenerating a policy key", err)),
                }
            }
            Err(Error::new(ErrorKind::Storage, format!("policy '{name}' kept changing under concurrent updates; try again")))
        })
    }

    fn watch(&self) -> broadcast::Receiver<RegistryChange> {
        self.changes.subscribe()
    }
}

#[derive(Serialize, Deserialize)]
struct ClaimValue {
    node: String,
    conn: u64,
}

pub(crate) struct NatsSessions {
    inner: Arc<Inner>,
    /// This node's live claims (core's in-process rule: the newest wins).
    local: Arc<LocalClaims>,
}

fn claim_key(device: &str) -> String {
    format!("c.{}", names::token(device))
}

impl NatsSessions {
    pub(crate) async fn open(inner: Arc<Inner>) -> Result<NatsSessions> {
        let local = Arc::new(LocalClaims::default());
        let mut w = inner.sessions.watch("c.>").await.map_err(|e| js_err("watching device sessions", e))?;
        let l = local.clone();
        let task = tokio::spawn(async move {
            while let Some(e) = w.next().await {
                let Ok(e) = e else { continue };
                if e.operation != Operation::Put {
                    continue;
                }
                let Ok(device) = names::untoken(e.key.trim_start_matches("c.")) else { continue };
                if l.supersede_below(&device, e.revision) {
                    tracing::info!(%device, "a newer connection of the device took over (400027)");
                }
            }
        });
        inner.tasks.lock().push(task);
        Ok(NatsSessions { inner, local })
    }
}

impl Sessions for NatsSessions {
    fn claim<'a>(&'a self, device_id: &'a str, conn: u64) -> BoxFut<'a, SessionClaim> {
        Box::pin(async move {
            let v = ClaimValue { node: self.inner.cfg.node.clone(), conn };
            let rev = self
                .inner
                .sessions
                .put(claim_key(device_id), Bytes::from(serde_json::to_vec(&v).expect("claim serializes")))
                .await
                .map_err(|e| js_err("claiming a device session", e))?;
            Ok(self.local.insert(device_id, rev))
        })
    }

    fn release(&self, claim: SessionClaim) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if self.local.remove(&claim) {
                // Only if no newer claim replaced it meanwhile.
                let _ = self.inner.sessions.delete_expect_revision(claim_key(&claim.device_id), Some(claim.revision)).await;
            }
            Ok(())
        })
    }
}

pub(crate) struct NatsCounters {
    pub(crate) inner: Arc<Inner>,
}

/// Adds `n` to counter `name` by compare-and-swap.
pub(crate) async fn add_counter(kv: &kv::Store, name: &str, n: u64) -> Result<()> {
    let key = names::token(name);
    for _ in 0..CAS_TRIES {
        let (cur, rev) = match kv.entry(&key).await.map_err(|e| js_err("reading a counter", e))? {
            Some(e) if e.operation == Operation::Put => {
                (std::str::from_utf8(&e.value).ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0), e.revision)
            }
            Some(e) => (0, e.revision),
            None => (0, 0),
        };
        let body = Bytes::from((cur + n).to_string());
        let r = if rev == 0 {
            kv.create(&key, body).await.map(|_| ()).map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists)
        } else {
            kv.update(&key, body, rev).await.map(|_| ()).map_err(|e| is_conflict(&e))
        };
        match r {
            Ok(()) => return Ok(()),
            Err(true) => continue,
            Err(false) => return Err(Error::new(ErrorKind::Storage, format!("JetStream counter '{name}' update failed"))),
        }
    }
    Err(Error::new(ErrorKind::Storage, format!("counter '{name}' kept changing under concurrent updates")))
}

impl Counters for NatsCounters {
    fn add<'a>(&'a self, name: &'a str, n: u64) -> BoxFut<'a, ()> {
        Box::pin(add_counter(&self.inner.counters, name, n))
    }

    fn all(&self) -> BoxFut<'_, Vec<(String, u64)>> {
        Box::pin(async move {
            let keys: Vec<String> = match self.inner.counters.keys().await {
                Ok(k) => k.try_collect().await.map_err(|e| js_err("listing counters", e))?,
                Err(e) => return Err(js_err("listing counters", e)),
            };
            let mut out = Vec::new();
            for k in keys {
                let v = self.inner.counters.get(&k).await.map_err(|e| js_err("reading a counter", e))?;
                let n = v.and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse().ok())).unwrap_or(0);
                out.push((names::untoken(&k)?, n));
            }
            out.sort();
            Ok(out)
        })
    }
}
