//! The identity registry: device identities (keys, status, generation id) and hub-level shared
//! access policies, event-sourced on a [`StateLog`] so every change is durable before it is
//! acknowledged.
//!
//! Invariants: device ids are unique; a re-created device gets a new generation id; the five
//! default policies exist from the first start on.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::auth;
use crate::error::{Error, ErrorKind, Result};
use crate::message::now_ms;
use crate::proto::{CreateDevice, DeviceIdentity, DeviceStatus};
use crate::store::{Durability, Machine, StateLog, StateOptions};

pub use crate::proto::{Policy, Right};

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    devices: BTreeMap<String, DeviceIdentity>,
    policies: BTreeMap<String, Policy>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Event {
    PutDevice(DeviceIdentity),
    DeleteDevice(String),
    PutPolicy(Policy),
}

impl Machine for State {
    fn apply(&mut self, event: &[u8]) -> Result<()> {
        let ev: Event =
            serde_json::from_slice(event).map_err(|e| Error::new(ErrorKind::Storage, format!("corrupt registry event: {e}")))?;
        match ev {
            Event::PutDevice(d) => {
                self.devices.insert(d.device_id.clone(), d);
            }
            Event::DeleteDevice(id) => {
                self.devices.remove(&id);
            }
            Event::PutPolicy(p) => {
                self.policies.insert(p.name.clone(), p);
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("registry state serializes")
    }

    fn restore(snapshot: Option<&[u8]>) -> Result<Self> {
        match snapshot {
            None => Ok(State::default()),
            Some(b) => serde_json::from_slice(b).map_err(|e| Error::new(ErrorKind::Storage, format!("corrupt registry snapshot: {e}"))),
        }
    }
}

/// The registry. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    log: StateLog<State>,
}

fn encode(ev: &Event) -> Vec<u8> {
    serde_json::to_vec(ev).expect("registry event serializes")
}

/// Checks a device id against IoT Hub's rules (reference §1.1) and MQTT topic constraints.
pub fn validate_device_id(id: &str) -> Result<()> {
    const EXTRA: &str = "-.%_*?!(),=@$':";
    if id.is_empty() || id.len() > 128 {
        return Err(Error::invalid(format!("device id must be 1 to 128 characters, got {}", id.len())));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || EXTRA.contains(*c))) {
        return Err(Error::invalid(format!(
            "device id '{id}' contains '{c}'; allowed are ASCII letters, digits and {EXTRA} ('+' and '#' cannot be used over MQTT)"
        )));
    }
    Ok(())
}

impl Registry {
    /// Opens the registry in `dir`, creating the default policies on first start.
    pub fn open(dir: &Path, durability: Durability) -> Result<Registry> {
        let log = StateLog::<State>::open(dir, StateOptions { durability, ..StateOptions::default() })?;
        let reg = Registry { log };
        for p in default_policies() {
            if reg.policy(&p.name).is_none() {
                let seq = reg.log.commit(&encode(&Event::PutPolicy(p)))?;
                reg.log.wait_durable_blocking(seq)?;
            }
        }
        Ok(reg)
    }

    /// A policy by name.
    pub fn policy(&self, name: &str) -> Option<Policy> {
        self.log.read(|s| s.policies.get(name).cloned())
    }

    /// Every policy, ordered by name (with keys: for owners only).
    pub fn policies(&self) -> Vec<Policy> {
        self.log.read(|s| s.policies.values().cloned().collect())
    }

    /// Regenerates a policy's `primary`, `secondary` or `both` keys; durable when this returns.
    /// Tokens signed with a replaced key stop being accepted at their next CONNECT (the hub
    /// also closes the connections that authenticated with it).
    pub async fn regenerate_policy(&self, name: &str, which: &str) -> Result<Policy> {
        let (p, seq) = self.log.commit_with(|s| {
            let mut p = s.policies.get(name).cloned().ok_or_else(|| no_policy(name))?;
            regenerate(&mut p.primary_key, &mut p.secondary_key, which)?;
            Ok((encode(&Event::PutPolicy(p.clone())), p))
        })?;
        self.log.wait_durable(seq).await?;
        Ok(p)
    }

    /// A device by id.
    pub fn device(&self, id: &str) -> Option<DeviceIdentity> {
        self.log.read(|s| s.devices.get(id).cloned())
    }

    /// All devices, ordered by id.
    pub fn devices(&self) -> Vec<DeviceIdentity> {
        self.log.read(|s| s.devices.values().cloned().collect())
    }

    /// Creates a device; durable when this returns. `AlreadyExists` if the id is taken.
    pub async fn create(&self, req: CreateDevice) -> Result<DeviceIdentity> {
        validate_create(&req)?;
        let (dev, seq) = self.log.commit_with(|s| {
            if s.devices.contains_key(&req.device_id) {
                return Err(already_exists(&req.device_id));
            }
            let dev = new_identity(&req);
            Ok((encode(&Event::PutDevice(dev.clone())), dev))
        })?;
        self.log.wait_durable(seq).await?;
        Ok(dev)
    }

    /// Changes a device's status and/or regenerates keys (`primary`, `secondary`, `both`).
    pub async fn update(&self, id: &str, status: Option<DeviceStatus>, regenerate: Option<&str>) -> Result<DeviceIdentity> {
        let (dev, seq) = self.log.commit_with(|s| {
            let mut dev = s.devices.get(id).cloned().ok_or_else(|| not_found(id))?;
            apply_update(&mut dev, status, regenerate)?;
            Ok((encode(&Event::PutDevice(dev.clone())), dev))
        })?;
        self.log.wait_durable(seq).await?;
        Ok(dev)
    }

    /// Deletes a device. `NotFound` if absent.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let ((), seq) = self.log.commit_with(|s| {
            if !s.devices.contains_key(id) {
                return Err(not_found(id));
            }
            Ok((encode(&Event::DeleteDevice(id.to_string())), ()))
        })?;
        self.log.wait_durable(seq).await
    }

    /// Closes the store.
    pub fn close(&self) -> Result<()> {
        self.log.close()
    }
}

/// The five policies every hub has from its first start on (IoT Hub's names and rights), with
/// fresh random keys.
pub fn default_policies() -> Vec<Policy> {
    [
        ("iothubowner", vec![Right::RegistryRead, Right::RegistryReadWrite, Right::ServiceConnect, Right::DeviceConnect]),
        ("service", vec![Right::ServiceConnect]),
        ("device", vec![Right::DeviceConnect]),
        ("registryRead", vec![Right::RegistryRead]),
        ("registryReadWrite", vec![Right::RegistryRead, Right::RegistryReadWrite]),
    ]
    .into_iter()
    .map(|(name, rights)| Policy { name: name.to_string(), primary_key: auth::generate_key(), secondary_key: auth::generate_key(), rights })
    .collect()
}

/// Checks a create request: the device id (IoT Hub's rules) and any given keys (16–64 bytes).
pub fn validate_create(req: &CreateDevice) -> Result<()> {
    validate_device_id(&req.device_id)?;
    for k in [&req.primary_key, &req.secondary_key].into_iter().flatten() {
        auth::check_identity_key(k)?;
    }
    Ok(())
}

/// The identity a validated create request makes: a new generation id, the given or generated
/// keys, enabled unless asked otherwise.
pub fn new_identity(req: &CreateDevice) -> DeviceIdentity {
    DeviceIdentity {
        device_id: req.device_id.clone(),
        generation_id: generation_id(),
        status: req.status.unwrap_or(DeviceStatus::Enabled),
        primary_key: req.primary_key.clone().unwrap_or_else(auth::generate_key),
        secondary_key: req.secondary_key.clone().unwrap_or_else(auth::generate_key),
        created_ms: now_ms(),
    }
}

/// Applies an update (status, key regeneration) to an identity.
pub fn apply_update(dev: &mut DeviceIdentity, status: Option<DeviceStatus>, regenerate_keys: Option<&str>) -> Result<()> {
    if let Some(st) = status {
        dev.status = st;
    }
    if let Some(which) = regenerate_keys {
        regenerate(&mut dev.primary_key, &mut dev.secondary_key, which)
            .map_err(|_| Error::invalid(format!("regenerate '{which}' is not primary, secondary or both")))?;
    }
    Ok(())
}

/// Replaces the `primary`, `secondary` or `both` keys with fresh random ones.
pub fn regenerate(primary: &mut String, secondary: &mut String, which: &str) -> Result<()> {
    match which {
        "primary" => *primary = auth::generate_key(),
        "secondary" => *secondary = auth::generate_key(),
        "both" => {
            *primary = auth::generate_key();
            *secondary = auth::generate_key();
        }
        other => return Err(Error::invalid(format!("key '{other}' is not primary, secondary or both"))),
    }
    Ok(())
}

/// The error for an id that is taken.
pub fn already_exists(id: &str) -> Error {
    Error::new(ErrorKind::AlreadyExists, format!("device '{id}' already exists"))
}

/// The error for an id that is not registered.
pub fn not_found(id: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("device '{id}' is not registered; create it with `hubmsg device-identity create --device-id {id}`"),
    )
}

/// The error for a policy name that does not exist.
pub fn no_policy(name: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("no policy named '{name}'; `hubmsg policy list` shows them"))
}

/// A new generation id: 18 decimal digits like IoT Hub's, unique per creation.
pub fn generation_id() -> String {
    // 18 decimal digits like IoT Hub's (reference §1.1), unique per creation.
    format!("{:018}", (now_ms() as u128 * 10_000 + fastrand::u128(0..10_000)) % 1_000_000_000_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_rules() {
        assert!(validate_device_id("pump-7.a_b@x$").is_ok());
        assert!(validate_device_id("").is_err());
        assert!(validate_device_id("a/b").is_err());
        assert!(validate_device_id("a+b").is_err());
        assert!(validate_device_id("a#b").is_err());
        assert!(validate_device_id(&"x".repeat(129)).is_err());
    }
}
