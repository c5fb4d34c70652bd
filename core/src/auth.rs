//! Identities and credentials (reference §1–§2): connection strings, SAS tokens (HMAC-SHA256),
//! scope checks by path segment, key generation. Pure: no I/O; time is passed in.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};
use crate::wire::{format_time_ms, url_decode, url_encode};

const SAS_FORMAT: &str = "expected `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`";
const VALID_KEYS: &str = "HostName, DeviceId, ModuleId, SharedAccessKeyName, SharedAccessKey, SharedAccessSignature, GatewayHostName";

/// Stands in for a secret in `Debug` output: prints `<redacted>`.
#[derive(Clone, Copy)]
pub struct Redacted;

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A parsed IoT Hub connection string (device or service / policy).
///
/// `HostName` may carry a port (`127.0.0.1:18830`) to reach a local hub on a non-default port;
/// plain IoT Hub strings mean TLS on 8883. `Debug` never prints the key or signature (`Display`
/// formats the whole string, secrets included, for handing it on).
#[derive(Clone, PartialEq, Eq, Default)]
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

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |v: &Option<String>| v.as_ref().map(|_| Redacted);
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .field("shared_access_key_name", &self.shared_access_key_name)
            .field("shared_access_key", &secret(&self.shared_access_key))
            .field("shared_access_signature", &secret(&self.shared_access_signature))
            .field("gateway_host_name", &self.gateway_host_name)
            .finish()
    }
}

impl ConnectionString {
    /// Parses `Key=Value;…` (split on the first `=` only; empty parts such as a trailing `;` are
    /// skipped; unknown or duplicate keys and empty values rejected; must be complete per
    /// reference §1.2: device (HostName, DeviceId, SharedAccessKey or SharedAccessSignature) or
    /// policy (HostName, SharedAccessKeyName, SharedAccessKey); `ModuleId` needs `DeviceId`).
    /// Also checks that `HostName` has a valid optional port, that `SharedAccessKey` is base64
    /// and that `SharedAccessSignature` is a well-formed token. Errors are `InvalidArgument` and
    /// never echo the key or signature.
    pub fn parse(s: &str) -> Result<ConnectionString> {
        let mut cs = ConnectionString::default();
        let mut host_name = None;
        for (index, part) in s.split(';').enumerate().filter(|(_, part)| !part.is_empty()) {
            let part_number = index + 1;
            let (key, value) = part.split_once('=').ok_or_else(|| {
                Error::invalid(format!("connection string part {part_number} has no `=`; write Key=Value pairs separated by `;`"))
            })?;
            let slot = match key {
                "HostName" => &mut host_name,
                "DeviceId" => &mut cs.device_id,
                "ModuleId" => &mut cs.module_id,
                "SharedAccessKeyName" => &mut cs.shared_access_key_name,
                "SharedAccessKey" => &mut cs.shared_access_key,
                "SharedAccessSignature" => &mut cs.shared_access_signature,
                "GatewayHostName" => &mut cs.gateway_host_name,
                _ => {
                    return Err(Error::invalid(format!(
                        "connection string part {part_number} has an unknown key (keys are case-sensitive); \
                         valid keys are {VALID_KEYS}"
                    )))
                }
            };
            if value.is_empty() {
                return Err(Error::invalid(format!("connection string has an empty {key}; give it a value")));
            }
            if slot.replace(value.to_owned()).is_some() {
                return Err(Error::invalid(format!("connection string has {key} twice; keep only one")));
            }
        }
        cs.host_name = host_name.ok_or_else(|| Error::invalid("connection string has no HostName"))?;
        split_host_port(&cs.host_name).map_err(|what| Error::invalid(format!("connection string HostName `{}` {what}", cs.host_name)))?;
        if cs.module_id.is_some() && cs.device_id.is_none() {
            return Err(Error::invalid("connection string has a ModuleId but no DeviceId; add the module's DeviceId"));
        }
        let complete = if cs.is_device() {
            cs.shared_access_key.is_some() || cs.shared_access_signature.is_some()
        } else {
            cs.shared_access_key_name.is_some() && cs.shared_access_key.is_some()
        };
        if !complete {
            return Err(Error::invalid(
                "connection string is incomplete: a device needs HostName, DeviceId and SharedAccessKey \
                 (or SharedAccessSignature); a policy needs HostName, SharedAccessKeyName and SharedAccessKey",
            ));
        }
        if let Some(key) = &cs.shared_access_key {
            decode_key(key)?;
        }
        if let Some(token) = &cs.shared_access_signature {
            SasToken::parse(token).map_err(|e| Error::invalid(format!("connection string SharedAccessSignature: {}", e.message())))?;
        }
        Ok(cs)
    }

    /// Whether this is a device (or module) string.
    pub fn is_device(&self) -> bool {
        self.device_id.is_some()
    }

    /// Host without the port (`127.0.0.1` for `127.0.0.1:18830`; brackets removed for `[::1]:p`).
    pub fn host(&self) -> &str {
        split_host_port(&self.host_name).map_or(&self.host_name, |(host, _)| host)
    }

    /// The port given in `HostName`, if any.
    pub fn port(&self) -> Option<u16> {
        split_host_port(&self.host_name).ok().and_then(|(_, port)| port)
    }
}

/// Splits `host[:port]`, `[v6]` or `[v6]:port`; a bare IPv6 address (several `:`) has no port.
/// The error says what is wrong with the text.
fn split_host_port(host_name: &str) -> std::result::Result<(&str, Option<u16>), &'static str> {
    let (host, port) = match host_name.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or("has `[` without a closing `]`")?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or("has text after `]` that is not `:port`")?)),
            }
        }
        None => match host_name.split_once(':') {
            Some((host, port)) if !port.contains(':') => (host, Some(port)),
            _ => (host_name, None),
        },
    };
    if host.is_empty() {
        return Err("has an empty host");
    }
    let port = port
        .map(|port| {
            Some(port)
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|&p| p != 0)
                .ok_or("has a port that is not a number from 1 to 65535")
        })
        .transpose()?;
    Ok((host, port))
}

impl std::fmt::Display for ConnectionString {
    /// Formats back to `HostName=…;DeviceId=…;SharedAccessKey=…` (keys in the canonical order
    /// HostName, DeviceId, ModuleId, SharedAccessKeyName, SharedAccessKey, SharedAccessSignature,
    /// GatewayHostName; absent ones omitted).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostName={}", self.host_name)?;
        for (key, value) in [
            ("DeviceId", &self.device_id),
            ("ModuleId", &self.module_id),
            ("SharedAccessKeyName", &self.shared_access_key_name),
            ("SharedAccessKey", &self.shared_access_key),
            ("SharedAccessSignature", &self.shared_access_signature),
            ("GatewayHostName", &self.gateway_host_name),
        ] {
            if let Some(value) = value {
                write!(f, ";{key}={value}")?;
            }
        }
        Ok(())
    }
}

/// A parsed SAS token (reference §2.1). `sr` is kept exactly as received (still URL-encoded).
/// `Debug` never prints the signature.
#[derive(Clone, PartialEq, Eq)]
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

impl std::fmt::Debug for SasToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasToken")
            .field("sr_raw", &self.sr_raw)
            .field("sig", &Redacted)
            .field("se_raw", &self.se_raw)
            .field("skn", &self.skn)
            .finish_non_exhaustive()
    }
}

impl SasToken {
    /// Parses `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]` in any field order. Missing
    /// `sr`/`sig`/`se`, unknown, repeated or empty fields, a bad escape in `sig` or `skn`, or a
    /// non-numeric `se` → `InvalidArgument`. Errors never echo the signature.
    pub fn parse(token: &str) -> Result<SasToken> {
        let fields = token
            .strip_prefix("SharedAccessSignature ")
            .ok_or_else(|| Error::invalid(format!("SAS token does not start with `SharedAccessSignature `; {SAS_FORMAT}")))?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for field in fields.split('&') {
            let (name, value) =
                field.split_once('=').ok_or_else(|| Error::invalid(format!("SAS token has a field without `=`; {SAS_FORMAT}")))?;
            let slot = match name {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => {
                    return Err(Error::invalid(format!(
                        "SAS token has an unknown field (only sr, sig, se and skn are allowed); {SAS_FORMAT}"
                    )))
                }
            };
            if value.is_empty() {
                return Err(Error::invalid(format!("SAS token field `{name}` is empty; {SAS_FORMAT}")));
            }
            if slot.replace(value).is_some() {
                return Err(Error::invalid(format!("SAS token has field `{name}` twice; {SAS_FORMAT}")));
            }
        }
        let decode =
            |name: &str, value: &str| url_decode(value).map_err(|e| Error::invalid(format!("SAS token field `{name}`: {}", e.message())));
        let sr_raw = required("sr", sr)?.to_owned();
        let sig = decode("sig", required("sig", sig)?)?;
        let se_raw = required("se", se)?.to_owned();
        let expiry = Some(&se_raw)
            .filter(|se| se.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|se| se.parse::<u64>().ok())
            .ok_or_else(|| Error::invalid(format!("SAS token field `se` is `{se_raw}`, not decimal seconds since the Unix epoch")))?;
        let skn = skn.map(|skn| decode("skn", skn)).transpose()?;
        Ok(SasToken { sr_raw, sig, se_raw, expiry, skn })
    }

    /// The resource URI, URL-decoded.
    pub fn resource_uri(&self) -> Result<String> {
        url_decode(&self.sr_raw).map_err(|e| Error::invalid(format!("SAS token field `sr`: {}", e.message())))
    }

    /// Verifies the signature with `key_b64` over `sr_raw + "\n" + se_raw` (reference §2.2 rec),
    /// and that `expiry > now_secs`. Wrong signature or bad key → `Unauthorized` ("signature does
    /// not match"); expired → `Unauthorized` ("token expired at …"). Constant-time comparison.
    pub fn verify(&self, key_b64: &str, now_secs: u64) -> Result<()> {
        let mismatch =
            || Error::new(ErrorKind::Unauthorized, "SAS token signature does not match; sign the token with the identity's current key");
        let mut mac = hmac_sha256(key_b64).map_err(|_| mismatch())?;
        mac.update(self.sr_raw.as_bytes());
        mac.update(b"\n");
        mac.update(self.se_raw.as_bytes());
        let sig = STANDARD.decode(&self.sig).map_err(|_| mismatch())?;
        mac.verify_slice(&sig).map_err(|_| mismatch())?;
        if self.expiry <= now_secs {
            return Err(Error::new(
                ErrorKind::Unauthorized,
                format!(
                    "SAS token expired at {} (se={}); generate a new token",
                    format_time_ms(self.expiry.saturating_mul(1000)),
                    self.se_raw
                ),
            ));
        }
        Ok(())
    }
}

/// A required SAS token field, or the error naming it.
fn required<'a>(name: &str, value: Option<&'a str>) -> Result<&'a str> {
    value.ok_or_else(|| Error::invalid(format!("SAS token has no `{name}` field; {SAS_FORMAT}")))
}

/// Creates a token: sr = url_encode(resource_uri), sig = base64(HMAC-SHA256(base64decode(key),
/// sr + "\n" + expiry)), URL-encoded; field order `sr, sig, se[, skn]` (matches vectors SAS-DEV,
/// SAS-MOD, SAS-SVC of the reference; `skn` is URL-encoded too). A key that is not base64 or is
/// empty, an empty resource URI or an empty policy name → `InvalidArgument`.
pub fn generate_sas_token(resource_uri: &str, key_b64: &str, expiry_secs: u64, policy: Option<&str>) -> Result<String> {
    if resource_uri.is_empty() {
        return Err(Error::invalid("the SAS resource URI is empty; use e.g. {host}/devices/{device_id}"));
    }
    if policy == Some("") {
        return Err(Error::invalid("the SAS policy name is empty; pass None for device keys"));
    }
    let sr = url_encode(resource_uri);
    let sig = sign(key_b64, format!("{sr}\n{expiry_secs}").as_bytes())?;
    let mut token = format!("SharedAccessSignature sr={sr}&sig={}&se={expiry_secs}", url_encode(&sig));
    if let Some(policy) = policy {
        token.push_str("&skn=");
        token.push_str(&url_encode(policy));
    }
    Ok(token)
}

/// base64(HMAC-SHA256(base64decode(key_b64), message)) — the signing primitive.
/// An empty or non-base64 key → `InvalidArgument`.
pub fn sign(key_b64: &str, message: &[u8]) -> Result<String> {
    let mut mac = hmac_sha256(key_b64)?;
    mac.update(message);
    Ok(STANDARD.encode(mac.finalize().into_bytes()))
}

/// Shortest and longest symmetric key IoT Hub accepts for a device or policy, in bytes after
/// base64 decoding.
pub const KEY_BYTES: std::ops::RangeInclusive<usize> = 16..=64;

/// Checks a symmetric key for an identity or policy: base64 of 16–64 bytes (IoT Hub's rule).
/// The error never echoes the key.
pub fn check_identity_key(key_b64: &str) -> Result<()> {
    let n = decode_key(key_b64)?.len();
    if !KEY_BYTES.contains(&n) {
        return Err(Error::invalid(format!(
            "a shared access key must decode to {} to {} bytes, this one has {n}; omit it to let the hub generate a 32-byte key",
            KEY_BYTES.start(),
            KEY_BYTES.end()
        )));
    }
    Ok(())
}

fn decode_key(key_b64: &str) -> Result<Vec<u8>> {
    let key = STANDARD
        .decode(key_b64)
        .map_err(|_| Error::invalid("the shared access key is not valid base64; copy the key exactly as the hub shows it"))?;
    if key.is_empty() {
        return Err(Error::invalid("the shared access key is empty; use the key the hub generated"));
    }
    Ok(key)
}

fn hmac_sha256(key_b64: &str) -> Result<Hmac<Sha256>> {
    // HMAC takes keys of any length; the error arm only satisfies the API.
    Hmac::<Sha256>::new_from_slice(&decode_key(key_b64)?)
        .map_err(|_| Error::invalid("the shared access key cannot be used as an HMAC-SHA256 key"))
}

/// Whether `scope` (a decoded resource URI) authorizes `target`, by path segment (reference
/// §2.3): the host part compares case-insensitively, the rest case-sensitively; `a/b` covers
/// `a/b` and `a/b/c` but not `a/bc`. A trailing `/` on either is ignored.
pub fn scope_covers(scope: &str, target: &str) -> bool {
    let ((scope_host, scope_path), (target_host, target_path)) = (split_uri(scope), split_uri(target));
    scope_host.eq_ignore_ascii_case(target_host)
        && (scope_path.is_empty() || target_path.strip_prefix(scope_path).is_some_and(|rest| rest.is_empty() || rest.starts_with('/')))
}

/// `(host, path)` of a resource URI, trailing `/`s ignored.
fn split_uri(uri: &str) -> (&str, &str) {
    let uri = uri.trim_end_matches('/');
    uri.split_once('/').unwrap_or((uri, ""))
}

/// The resource URI a device key signs: `{host}/devices/{device_id}`, with `host` exactly as
/// passed in.
pub fn device_resource_uri(host: &str, device_id: &str) -> String {
    format!("{host}/devices/{device_id}")
}

/// A new random 256-bit key, base64 (for device identities and policies). The randomness comes
/// from the operating system's CSPRNG: three v4 UUIDs (366 random bits, drawn through
/// `getrandom`) condensed with SHA-256.
pub fn generate_key() -> String {
    let mut hasher = Sha256::new();
    for _ in 0..3 {
        hasher.update(uuid::Uuid::new_v4().as_bytes());
    }
    STANDARD.encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key of vector HMAC-1, also used for SAS-DEV, SAS-MOD and SAS-SVC.
    const KEY: &str = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";
    const SE: u64 = 1_578_941_692;
    const SAS_DEV: &str = "SharedAccessSignature sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device\
                           &sig=dIMMdDDBGFR8eqAfYkiMxoOphaFMPtMgj7Wg%2FYB1AvU%3D&se=1578941692";
    const SAS_MOD: &str = "SharedAccessSignature sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device%2Fmodules%2Fmy_module\
                           &sig=iAQRxkGTvQpFKsLRYZsj0xf8UcgKBbNZhWDb5pCSK9o%3D&se=1578941692";
    const SAS_SVC: &str = "SharedAccessSignature sr=myiothub.azure-devices.net\
                           &sig=jNLd5fT1OOOh8Q3GOXfi%2BCbnqvMsE7%2BlpEsBASuS%2FKI%3D&se=1578941692&skn=iothubowner";
    const OTHER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn err_kind<T: std::fmt::Debug>(result: Result<T>, kind: ErrorKind) -> Error {
        let err = result.expect_err("expected an error");
        assert_eq!(err.kind(), kind, "{err}");
        err
    }

    fn invalid<T: std::fmt::Debug>(result: Result<T>) -> Error {
        err_kind(result, ErrorKind::InvalidArgument)
    }

    #[test]
    fn hmac_1_vector() {
        let key = STANDARD.decode(KEY).unwrap();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "34c8090ef74a4f18cb8bec41c719030c4c0327112f384e6ef01893d265603de8");
        assert_eq!(sign(KEY, b"sign this message").unwrap(), "8NJRMT83CcplGrAGaUVIUM/md5914KpWVNngSVoF9/M=");
    }

    #[test]
    fn string_to_sign_vectors() {
        let cases = [
            ("myiothub.azure-devices.net%2Fdevices%2Fmy_device", "dIMMdDDBGFR8eqAfYkiMxoOphaFMPtMgj7Wg/YB1AvU="),
            ("myiothub.azure-devices.net%2Fdevices%2Fmy_device%2Fmodules%2Fmy_module", "iAQRxkGTvQpFKsLRYZsj0xf8UcgKBbNZhWDb5pCSK9o="),
            ("myiothub.azure-devices.net", "jNLd5fT1OOOh8Q3GOXfi+CbnqvMsE7+lpEsBASuS/KI="),
        ];
        for (sr, sig) in cases {
            assert_eq!(sign(KEY, format!("{sr}\n{SE}").as_bytes()).unwrap(), sig, "{sr}");
        }
    }

    #[test]
    fn generate_matches_sas_vectors() {
        let device = device_resource_uri("myiothub.azure-devices.net", "my_device");
        assert_eq!(device, "myiothub.azure-devices.net/devices/my_device");
        assert_eq!(generate_sas_token(&device, KEY, SE, None).unwrap(), SAS_DEV);
        let module = format!("{device}/modules/my_module");
        assert_eq!(generate_sas_token(&module, KEY, SE, None).unwrap(), SAS_MOD);
        assert_eq!(generate_sas_token("myiothub.azure-devices.net", KEY, SE, Some("iothubowner")).unwrap(), SAS_SVC);
    }

    #[test]
    fn sas_vectors_parse_and_verify() {
        for (token, uri, skn) in [
            (SAS_DEV, "myiothub.azure-devices.net/devices/my_device", None),
            (SAS_MOD, "myiothub.azure-devices.net/devices/my_device/modules/my_module", None),
            (SAS_SVC, "myiothub.azure-devices.net", Some("iothubowner")),
        ] {
            let parsed = SasToken::parse(token).unwrap();
            assert_eq!(parsed.resource_uri().unwrap(), uri);
            assert_eq!(parsed.sr_raw, url_encode(uri));
            assert_eq!((parsed.expiry, parsed.se_raw.as_str()), (SE, "1578941692"));
            assert_eq!(parsed.skn.as_deref(), skn);
            parsed.verify(KEY, SE - 1).unwrap();
        }
        assert_eq!(SasToken::parse(SAS_DEV).unwrap().sig, "dIMMdDDBGFR8eqAfYkiMxoOphaFMPtMgj7Wg/YB1AvU=");
    }

    #[test]
    fn verify_rejects_wrong_key_tampering_and_expiry() {
        let token = SasToken::parse(SAS_DEV).unwrap();
        let mismatch = |token: &SasToken, key: &str| {
            let err = err_kind(token.verify(key, SE - 1), ErrorKind::Unauthorized);
            assert!(err.message().contains("signature does not match"), "{err}");
            for secret in [key, token.sig.as_str()].into_iter().filter(|s| !s.is_empty()) {
                assert!(!err.message().contains(secret), "{err}");
            }
        };
        mismatch(&token, OTHER_KEY);
        mismatch(&token, "not base64!");
        mismatch(&token, "");
        mismatch(&SasToken { se_raw: "1578941693".into(), expiry: SE + 1, ..token.clone() }, KEY);
        mismatch(&SasToken { sr_raw: "myiothub.azure-devices.net%2Fdevices%2Fother".into(), ..token.clone() }, KEY);
        mismatch(&SasToken { sig: "not base64!".into(), ..token.clone() }, KEY);
        mismatch(&SasToken { sig: STANDARD.encode([0u8; 32]), ..token.clone() }, KEY);
        // A truncated signature must not verify as a prefix.
        let truncated = STANDARD.encode(&STANDARD.decode(&token.sig).unwrap()[..16]);
        mismatch(&SasToken { sig: truncated, ..token.clone() }, KEY);

        for now in [SE, SE + 1, u64::MAX] {
            let err = err_kind(token.verify(KEY, now), ErrorKind::Unauthorized);
            assert!(err.message().contains("token expired at 2020-01-13T18:54:52.000Z"), "{err}");
        }
    }

    #[test]
    fn verify_uses_sr_exactly_as_received() {
        // Older tools encode with lower-case hex; the signature covers that exact text.
        let sr = "myiothub.azure-devices.net%2fdevices%2fmy_device";
        let sig = sign(KEY, format!("{sr}\n{SE}").as_bytes()).unwrap();
        let token = format!("SharedAccessSignature sr={sr}&sig={}&se={SE}", url_encode(&sig));
        let parsed = SasToken::parse(&token).unwrap();
        parsed.verify(KEY, 0).unwrap();
        assert_eq!(parsed.resource_uri().unwrap(), "myiothub.azure-devices.net/devices/my_device");
    }

    #[test]
    fn parse_is_order_independent() {
        let reordered = "SharedAccessSignature skn=iothubowner&se=1578941692\
                         &sig=jNLd5fT1OOOh8Q3GOXfi%2BCbnqvMsE7%2BlpEsBASuS%2FKI%3D&sr=myiothub.azure-devices.net";
        assert_eq!(SasToken::parse(reordered).unwrap(), SasToken::parse(SAS_SVC).unwrap());
    }

    #[test]
    fn parse_rejects_malformed_tokens_without_echoing_the_signature() {
        let sig = "dIMMdDDBGFR8eqAfYkiMxoOphaFMPtMgj7Wg%2FYB1AvU%3D";
        for token in [
            "".to_owned(),
            format!("sr=a&sig={sig}&se=1"),
            format!("sharedaccesssignature sr=a&sig={sig}&se=1"),
            format!("SharedAccessSignature  sr=a&sig={sig}&se=1"),
            format!("SharedAccessSignature sig={sig}&se=1"),
            "SharedAccessSignature sr=a&se=1".to_owned(),
            format!("SharedAccessSignature sr=a&sig={sig}"),
            format!("SharedAccessSignature sr=a&sig={sig}&se=1&sv=2"),
            format!("SharedAccessSignature sr=a&sig={sig}&se=1&sr=b"),
            format!("SharedAccessSignature sr=a&sig={sig}&se=1&"),
            format!("SharedAccessSignature sr=a&sig={sig}&se=1&skn="),
            format!("SharedAccessSignature sr=&sig={sig}&se=1"),
            format!("SharedAccessSignature sr=a&sig={sig}&se"),
            format!("SharedAccessSignature sr=a&sig={sig}&se=12a"),
            format!("SharedAccessSignature sr=a&sig={sig}&se=+12"),
            format!("SharedAccessSignature sr=a&sig={sig}&se=-1"),
            format!("SharedAccessSignature sr=a&sig={sig}&se=18446744073709551616"),
            format!("SharedAccessSignature sr=a&sig={sig}%zz&se=1"),
        ] {
            let err = invalid(SasToken::parse(&token));
            assert!(!err.message().contains(sig) && !err.message().contains("dIMMdDDBGFR8"), "{err}");
        }
        assert_eq!(SasToken::parse("SharedAccessSignature sr=a&sig=b&se=18446744073709551615").unwrap().expiry, u64::MAX);
        invalid(SasToken::parse("SharedAccessSignature sr=%zz&sig=b&se=1").unwrap().resource_uri());
    }

    #[test]
    fn generate_and_sign_reject_bad_input_without_echoing_the_key() {
        for key in ["not base64!", "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg", ""] {
            let err = invalid(generate_sas_token("hub/devices/d", key, SE, None));
            assert!(key.is_empty() || !err.message().contains(key), "{err}");
            invalid(sign(key, b"x"));
        }
        invalid(generate_sas_token("", KEY, SE, None));
        invalid(generate_sas_token("hub", KEY, SE, Some("")));
    }

    #[test]
    fn generated_tokens_round_trip() {
        let uri = "hub.example:8883/devices/dev 1+/modules/m";
        let token = generate_sas_token(uri, KEY, 42, Some("my policy")).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(parsed.resource_uri().unwrap(), uri);
        assert_eq!(parsed.skn.as_deref(), Some("my policy"));
        parsed.verify(KEY, 41).unwrap();
        err_kind(parsed.verify(OTHER_KEY, 41), ErrorKind::Unauthorized);
    }

    #[test]
    fn scope_covers_by_path_segment() {
        assert!(scope_covers("/a/b", "/a/b"));
        assert!(scope_covers("/a/b", "/a/b/c"));
        assert!(!scope_covers("/a/b", "/a/bc"));
        assert!(!scope_covers("/a/b/c", "/a/b"));
        let device = "myhub.azure-devices.net/devices/d1";
        assert!(scope_covers(device, device));
        assert!(scope_covers(device, "MyHub.Azure-Devices.NET/devices/d1"));
        assert!(scope_covers(device, "myhub.azure-devices.net/devices/d1/modules/m1"));
        assert!(!scope_covers(device, "myhub.azure-devices.net/devices/d10"));
        assert!(!scope_covers(device, "myhub.azure-devices.net/devices/D1"));
        assert!(!scope_covers(device, "myhub.azure-devices.net/devices"));
        assert!(!scope_covers(device, "otherhub.azure-devices.net/devices/d1"));
        assert!(scope_covers("myhub.azure-devices.net/devices", device));
        assert!(scope_covers("myhub.azure-devices.net", device));
        assert!(scope_covers("myhub.azure-devices.net/", device));
        assert!(scope_covers("myhub.azure-devices.net/devices/d1/", "myhub.azure-devices.net/devices/d1"));
        assert!(scope_covers(device, "myhub.azure-devices.net/devices/d1/"));
        assert!(!scope_covers("myhub.azure-devices.net", "myhub.azure-devices.netx/devices/d1"));
        assert!(!scope_covers("myhub", "myhub.azure-devices.net"));
    }

    #[test]
    fn generated_keys_are_random_256_bit_base64() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        for key in [&a, &b] {
            assert_eq!(STANDARD.decode(key).unwrap().len(), 32);
            sign(key, b"x").unwrap();
        }
    }

    fn cs(s: &str) -> ConnectionString {
        ConnectionString::parse(s).unwrap()
    }

    #[test]
    fn connection_string_kinds() {
        let device = cs(&format!("HostName=myhub.azure-devices.net;DeviceId=d1;SharedAccessKey={KEY}"));
        assert_eq!(
            device,
            ConnectionString {
                host_name: "myhub.azure-devices.net".into(),
                device_id: Some("d1".into()),
                shared_access_key: Some(KEY.into()),
                ..Default::default()
            }
        );
        assert!(device.is_device());
        assert_eq!((device.host(), device.port()), ("myhub.azure-devices.net", None));

        let module = cs(&format!("DeviceId=d1;ModuleId=m1;SharedAccessKey={KEY};HostName=h;GatewayHostName=edge"));
        assert_eq!(module.module_id.as_deref(), Some("m1"));
        assert_eq!(module.gateway_host_name.as_deref(), Some("edge"));

        let token_device = cs(&format!("HostName=h;DeviceId=my_device;SharedAccessSignature={SAS_DEV}"));
        assert_eq!(token_device.shared_access_signature.as_deref(), Some(SAS_DEV));

        let policy = cs(&format!("HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY};"));
        assert!(!policy.is_device());
        assert_eq!(policy.shared_access_key_name.as_deref(), Some("iothubowner"));
    }

    #[test]
    fn connection_string_display_round_trips_in_canonical_order() {
        let text = format!(
            "HostName=127.0.0.1:18830;DeviceId=d1;ModuleId=m1;SharedAccessKeyName=device;\
             SharedAccessKey={KEY};SharedAccessSignature={SAS_DEV};GatewayHostName=edge"
        );
        assert_eq!(cs(&text).to_string(), text);
        let shuffled = format!("SharedAccessKey={KEY};DeviceId=d1;HostName=h");
        assert_eq!(cs(&shuffled).to_string(), format!("HostName=h;DeviceId=d1;SharedAccessKey={KEY}"));
        assert_eq!(cs(&cs(&shuffled).to_string()), cs(&shuffled));
    }

    #[test]
    fn connection_string_host_and_port() {
        for (host_name, host, port) in [
            ("127.0.0.1:18830", "127.0.0.1", Some(18830)),
            ("localhost", "localhost", None),
            ("localhost:8883", "localhost", Some(8883)),
            ("[::1]:1883", "::1", Some(1883)),
            ("[::1]", "::1", None),
            ("::1", "::1", None),
            ("myhub.azure-devices.net", "myhub.azure-devices.net", None),
        ] {
            let parsed = cs(&format!("HostName={host_name};DeviceId=d;SharedAccessKey={KEY}"));
            assert_eq!(parsed.host_name, host_name);
            assert_eq!((parsed.host(), parsed.port()), (host, port), "{host_name}");
        }
    }

    #[test]
    fn connection_string_rejects_malformed_without_echoing_secrets() {
        let key = KEY;
        for text in [
            String::new(),
            format!("HostName=h;DeviceId=d;SharedAccessKey;{key}"),
            format!("HostName=h;DeviceId=d;SharedAccessKey={key};Foo=bar"),
            format!("HostName=h;DeviceId=d;sharedaccesskey={key}"),
            format!("HostName=h;DeviceId=d;x509=true;SharedAccessKey={key}"),
            format!("HostName=h;DeviceId=d;SharedAccessKey={key};SharedAccessKey={key}"),
            format!("HostName=h;DeviceId=;SharedAccessKey={key}"),
            format!("DeviceId=d;SharedAccessKey={key}"),
            "HostName=h;DeviceId=d".to_owned(),
            format!("HostName=h;SharedAccessKey={key}"),
            "HostName=h;SharedAccessKeyName=p".to_owned(),
            format!("HostName=h;ModuleId=m;SharedAccessKeyName=p;SharedAccessKey={key}"),
            "HostName=h;DeviceId=d;SharedAccessKey=not*base64".to_owned(),
            "HostName=h;DeviceId=d;SharedAccessSignature=sr=a&sig=NMgJDvdKTxjLi&se=1".to_owned(),
            "HostName=h;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=a&sig=NMgJDvdKTxjLi&se=x".to_owned(),
            format!("HostName=h:;DeviceId=d;SharedAccessKey={key}"),
            format!("HostName=h:0;DeviceId=d;SharedAccessKey={key}"),
            format!("HostName=h:65536;DeviceId=d;SharedAccessKey={key}"),
            format!("HostName=h:+80;DeviceId=d;SharedAccessKey={key}"),
            format!("HostName=:80;DeviceId=d;SharedAccessKey={key}"),
            format!("HostName=[::1;DeviceId=d;SharedAccessKey={key}"),
            format!("HostName=[::1]80;DeviceId=d;SharedAccessKey={key}"),
            format!("HostName=[]:80;DeviceId=d;SharedAccessKey={key}"),
        ] {
            let err = invalid(ConnectionString::parse(&text));
            for secret in [key, "NMgJDvdKTxjLi", "not*base64"] {
                assert!(!err.message().contains(secret), "{text}: {err}");
            }
        }
    }
}
