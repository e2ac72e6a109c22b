//! TLS material from PEM files (rustls 0.23 on the `ring` provider, the one reqwest already uses),
//! shared by the controller and the gate agent: server configurations for the controller's HTTP
//! listeners (optionally requiring a client certificate from a CA: mutual TLS between controller
//! nodes), client configurations for MQTT, CA root stores. Every file is read and checked once, at
//! start, so a missing or unreadable certificate is a clear error naming the file, never a failed
//! handshake later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path}: no certificate in the file")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0:?}")]
    Verifier(rustls::server::VerifierBuilderError),
    #[error("{path}: not accepted as a client certificate by the CAs of {ca}: {source}")]
    ClientCertificate { path: PathBuf, ca: PathBuf, source: rustls::Error },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// Every certificate of a PEM file (a chain or a CA bundle); at least one.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_owned(), message: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| TlsError::Pem { path: path.to_owned(), message: e.to_string() })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A root store holding exactly the certificates of `ca_file`.
pub fn roots(ca_file: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certificates(ca_file)? {
        store.add(c)?;
    }
    Ok(store)
}

/// A server configuration presenting the chain of `cert_file` with the key of `key_file`.
/// The key must match the certificate (checked here, so a mismatch fails at start).
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, TlsError> {
    let chain = certificates(cert_file)?;
    let key = private_key(key_file)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(config)
}

/// The verifier of client certificates: a chain to one of the CAs of `client_ca_file`, valid now,
/// usable for client authentication (the clientAuth extended key usage, when the certificate
/// restricts its usages). A client without a certificate is refused.
pub fn client_verifier(client_ca_file: &Path) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_ca_file)?), provider())
        .build()
        .map_err(TlsError::Verifier)
}

/// [`server_config`] that also requires every client to present a certificate accepted by
/// [`client_verifier`] of `client_ca_file`: the handshake of any other client fails, before a
/// single byte of its request is read.
pub fn server_config_requiring_client_cert(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: &Path,
) -> Result<ServerConfig, TlsError> {
    let chain = certificates(cert_file)?;
    let key = private_key(key_file)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(client_verifier(client_ca_file)?)
        .with_single_cert(chain, key)?;
    Ok(config)
}

/// Checks, at start, that the chain of `cert_file` would be accepted as a client certificate by a
/// server requiring one from `ca_file` (chains to it, valid now, clientAuth usage allowed), so a
/// node whose certificate lacks the clientAuth usage stops with this error instead of failing
/// every handshake later.
pub fn check_client_certificate(cert_file: &Path, ca_file: &Path) -> Result<(), TlsError> {
    let chain = certificates(cert_file)?;
    let (leaf, intermediates) =
        chain.split_first().ok_or_else(|| TlsError::NoCertificate { path: cert_file.to_owned() })?;
    client_verifier(ca_file)?.verify_client_cert(leaf, intermediates, UnixTime::now()).map(|_| ()).map_err(
        |source| TlsError::ClientCertificate { path: cert_file.to_owned(), ca: ca_file.to_owned(), source },
    )
}

/// Whether the (already verified) certificate `cert` is valid for the host name or IP address
/// `host`, as a server certificate for `host` would be checked.
pub fn certificate_names(cert: &CertificateDer<'_>, host: &str) -> bool {
    let Ok(name) = ServerName::try_from(host) else { return false };
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(cert) else { return false };
    rustls::client::verify_server_name(&parsed, &name).is_ok()
}

/// A client configuration trusting only the CAs of `ca_file`, optionally presenting a client
/// certificate (for brokers that authenticate clients by certificate).
pub fn client_config(ca_file: &Path, client: Option<(&Path, &Path)>) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_file)?);
    Ok(match client {
        Some((cert, key)) => builder.with_client_auth_cert(certificates(cert)?, private_key(key)?)?,
        None => builder.with_no_client_auth(),
    })
}

/// `[mqtt.tls]` of the controller's and the gate agent's configuration: TLS of the MQTT connection.
/// The name checked in the broker's certificate is the host part of the broker address.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTls {
    /// CA certificates (PEM) the broker's certificate must chain to; the system roots are not used.
    pub ca_file: PathBuf,
    /// A client certificate chain and key (PEM), for brokers that authenticate clients by
    /// certificate (Mosquitto `require_certificate`): both or neither.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

impl MqttTls {
    /// The rustls client configuration; fails on unreadable or invalid files.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let client = match (&self.client_cert_file, &self.client_key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        client_config(&self.ca_file, client)
    }
}
