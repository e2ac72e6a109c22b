//! TLS of the MQTT connection: the client configuration built once at start from the PEM files
//! named in `[mqtt.tls]` (by `afc-tls`, shared with the controller), so a missing or invalid file
//! is a clear start-up error naming it, never a failing handshake later.

use std::path::Path;
use std::sync::Arc;

pub use afc_tls::TlsError;

/// A client configuration trusting only the CAs of `ca_file`, presenting `client` (certificate
/// chain, key) when the broker authenticates clients by certificate.
pub fn client_config(
    ca_file: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    Ok(Arc::new(afc_tls::client_config(ca_file, client)?))
}
