//! TLS of the controller: the PEM handling and rustls configurations are `afc-tls` (shared with
//! the gate agent); this adds the CA bundle for the reqwest clients.

use std::path::Path;

pub use afc_tls::{certificates, client_config, private_key, roots, server_config, TlsError};

/// The CA bundle of `ca_file` as reqwest root certificates.
pub fn reqwest_roots(ca_file: &Path) -> Result<Vec<reqwest::Certificate>, TlsError> {
    let certs = certificates(ca_file)?;
    certs
        .iter()
        .map(|c| {
            reqwest::Certificate::from_der(c.as_ref())
                .map_err(|e| TlsError::Pem { path: ca_file.to_owned(), message: e.to_string() })
        })
        .collect()
}
