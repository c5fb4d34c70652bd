//! Server TLS: load a certificate and key from PEM files, or generate a self-signed certificate
//! for local use (localhost, 127.0.0.1, ::1) into the hub's data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

/// Certificate and key PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Returns the files in `dir/tls/`, generating a self-signed certificate for `names` there first
/// if none exists. The certificate is also the CA file clients must trust. Both files are
/// written atomically and fsync'd (the key readable by the owner only), the key first, so a
/// crash leaves either no certificate (both are made again) or a matching pair.
pub fn ensure_self_signed(dir: &Path, names: &[String]) -> Result<TlsFiles> {
    let tls_dir = dir.join("tls");
    let files = TlsFiles { cert: tls_dir.join("cert.pem"), key: tls_dir.join("key.pem") };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    let fs = crate::store::io::real();
    crate::store::io::create_dir_durable(&*fs, &tls_dir)?;
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| Error::new(ErrorKind::Internal, format!("generating a self-signed certificate failed: {e}")))?;
    crate::store::io::write_atomic(&*fs, &files.key, ck.key_pair.serialize_pem().as_bytes(), true)?;
    crate::store::io::write_atomic(&*fs, &files.cert, ck.cert.pem().as_bytes(), false)?;
    Ok(files)
}

/// Builds a rustls server configuration from PEM files.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let certs = crate::transport::load_certs(&files.cert)?;
    let key_pem = std::fs::read(&files.key).map_err(|e| Error::invalid(format!("cannot read {}: {e}", files.key.display())))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| Error::invalid(format!("{}: not a PEM private key: {e}", files.key.display())))?
        .ok_or_else(|| Error::invalid(format!("{}: no private key found", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::invalid(format!("certificate and key do not fit together: {e}")))?;
    Ok(Arc::new(config))
}
