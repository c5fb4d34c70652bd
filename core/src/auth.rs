//! Identities and credentials (reference §1–§2): connection strings, SAS tokens (HMAC-SHA256),
//! scope checks by path segment, key generation. Pure: no I/O; time is passed in.

use crate::error::{Error, Result};

/// A parsed IoT Hub connection string (device or service / policy).
///
/// `HostName` may carry a port (`127.0.0.1:18830`) to reach a local hub on a non-default port;
/// plain IoT Hub strings mean TLS on 8883.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectionString {
    /// `HostName`, exactly as written (may include `:port`).
    pub host_name: String,
    /// `DeviceId` (device strings).
    pub device_id: Option<String>,
    /// `ModuleId`.
    pub module_id: Option<String>,
    /// `SharedAccessKeyName` (policy strings).
    pub shared_access_key_name: Option<String>,
    /// `SharedAccessKey` (base64).
    pub shared_access_key: Option<String>,
    /// `SharedAccessSignature` (a ready-made token).
    pub shared_access_signature: Option<String>,
    /// `GatewayHostName`.
    pub gateway_host_name: Option<String>,
}

impl ConnectionString {
    /// Parses `Key=Value;…` (split on the first `=` only; unknown or duplicate keys rejected;
    /// must be complete per reference §1.2: device (HostName, DeviceId, SharedAccessKey or
    /// SharedAccessSignature) or policy (HostName, SharedAccessKeyName, SharedAccessKey)).
    /// Errors are `InvalidArgument` and never echo the key.
    pub fn parse(s: &str) -> Result<ConnectionString> {
        todo!()
    }

    /// Whether this is a device (or module) string.
    pub fn is_device(&self) -> bool {
        self.device_id.is_some()
    }

    /// Host without the port (`127.0.0.1` for `127.0.0.1:18830`; brackets removed for `[::1]:p`).
    pub fn host(&self) -> &str {
        todo!()
    }

    /// The port given in `HostName`, if any.
    pub fn port(&self) -> Option<u16> {
        todo!()
    }
}

impl std::fmt::Display for ConnectionString {
    /// Formats back to `HostName=…;DeviceId=…;SharedAccessKey=…` (keys in the canonical order
    /// HostName, DeviceId, ModuleId, SharedAccessKeyName, SharedAccessKey, SharedAccessSignature,
    /// GatewayHostName; absent ones omitted).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        todo!()
    }
}

/// A parsed SAS token (reference §2.1). `sr` is kept exactly as received (still URL-encoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as in the token (URL-encoded resource URI).
    pub sr_raw: String,
    /// `sig`, URL-decoded (base64 text).
    pub sig: String,
    /// `se` text as received.
    pub se_raw: String,
    /// `se` as seconds since the Unix epoch.
    pub expiry: u64,
    /// `skn` (policy name) if present.
    pub skn: Option<String>,
}

impl SasToken {
    /// Parses `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]` in any field order. Missing
    /// `sr`/`sig`/`se`, unknown fields, or a non-numeric `se` → `InvalidArgument`.
    pub fn parse(token: &str) -> Result<SasToken> {
        todo!()
    }

    /// The resource URI, URL-decoded.
    pub fn resource_uri(&self) -> Result<String> {
        todo!()
    }

    /// Verifies the signature with `key_b64` over `sr_raw + "\n" + se_raw` (reference §2.2 rec),
    /// and that `expiry > now_secs`. Wrong signature or bad key → `Unauthorized` ("signature does
    /// not match"); expired → `Unauthorized` ("token expired at …"). Constant-time comparison.
    pub fn verify(&self, key_b64: &str, now_secs: u64) -> Result<()> {
        todo!()
    }
}

/// Creates a token: sr = url_encode(resource_uri), sig = base64(HMAC-SHA256(base64decode(key),
/// sr + "\n" + expiry)), URL-encoded; field order `sr, sig, se[, skn]` (matches vectors SAS-DEV,
/// SAS-MOD, SAS-SVC of the reference). A key that is not base64 → `InvalidArgument`.
pub fn generate_sas_token(resource_uri: &str, key_b64: &str, expiry_secs: u64, policy: Option<&str>) -> Result<String> {
    todo!()
}

/// base64(HMAC-SHA256(base64decode(key_b64), message)) — the signing primitive.
pub fn sign(key_b64: &str, message: &[u8]) -> Result<String> {
    todo!()
}

/// Whether `scope` (a decoded resource URI) authorizes `target`, by path segment (reference
/// §2.3): the host part compares case-insensitively, the rest case-sensitively; `a/b` covers
/// `a/b` and `a/b/c` but not `a/bc`. A trailing `/` on either is ignored.
pub fn scope_covers(scope: &str, target: &str) -> bool {
    todo!()
}

/// The resource URI a device key signs: `{host}/devices/{device_id}` (host without port? no:
/// exactly the `host` passed in).
pub fn device_resource_uri(host: &str, device_id: &str) -> String {
    todo!()
}

/// A new random 256-bit key, base64 (for device identities and policies).
pub fn generate_key() -> String {
    todo!()
}
