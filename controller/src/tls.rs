//! TLS of the controller: the PEM handling and rustls configurations are `afc-tls` (shared with
//! the gate agent); this adds the `[tls]` section ([`TlsConfig`], which `config` re-exports) and
//! its checks, the Raft/admin listener's server configuration (mutual TLS with
//! `require_client_cert`), and the CA bundle and client identity of the reqwest clients that reach
//! other nodes. It imports nothing of `config`.

use std::path::{Path, PathBuf};

pub use afc_tls::{
    certificate_names, certificates, check_client_certificate, client_config, private_key, roots,
    server_config, server_config_requiring_client_cert, TlsError,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// TLS (rustls) of this node's HTTP listeners and of its HTTP clients to other nodes. Files are
/// PEM; they are read and checked at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This node's certificate chain (leaf first). Its names must include the host part of
    /// `advertise` (peers check it) and the names clients use for the API.
    pub cert_file: PathBuf,
    /// The private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The CA certificates other nodes' certificates chain to. This node's HTTP clients (Raft
    /// RPCs, forwarding to the leader) trust only these, not the system roots.
    pub ca_file: PathBuf,
    /// Serve the operations API (`api.listen`) over https.
    #[serde(default = "yes")]
    pub api: bool,
    /// Serve the Raft/admin listener over https and reach peers with https. Every node of a
    /// cluster must agree (peers are addressed by `host:port`, the scheme comes from here).
    #[serde(default = "yes")]
    pub peers: bool,
    /// Mutual TLS between nodes (the recommended production setting): the Raft/admin listener
    /// completes a handshake only with a client presenting a certificate from `ca_file` (the
    /// station CA) usable for client authentication; any other client gets no answer at all.
    /// Needs `peers`. The API listener never asks for client certificates.
    #[serde(default)]
    pub require_client_cert: bool,
    /// The certificate chain (and its key) this node presents when it calls another node's
    /// Raft/admin listener; default `cert_file`/`key_file`, which then needs the clientAuth
    /// extended key usage besides serverAuth (or no key-usage restriction). Both or neither.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

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

/// `sha256:` and the hex SHA-256 of a certificate's DER bytes: how an audit line names the client
/// certificate a request came with (the same value `openssl x509 -noout -fingerprint -sha256`
/// prints, in lower case without colons).
pub fn fingerprint(cert: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(cert)))
}

impl TlsConfig {
    /// The certificate chain and key this node presents to other nodes' Raft/admin listeners.
    pub fn client_identity_files(&self) -> (&Path, &Path) {
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(c), Some(k)) => (c, k),
            _ => (&self.cert_file, &self.key_file),
        }
    }

    /// Reads and checks every file once (at config load): the server certificate and key, the CA
    /// bundle, and with `require_client_cert` (or an explicit client certificate) that this node's
    /// own client certificate would pass its peers' check.
    pub fn check(&self) -> Result<(), String> {
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err("client_cert_file and client_key_file go together".into());
        }
        if self.require_client_cert && !self.peers {
            return Err(
                "require_client_cert needs peers = true (mutual TLS is on the Raft/admin listener)".into()
            );
        }
        self.peer_server_config().map_err(|e| e.to_string())?;
        server_config(&self.cert_file, &self.key_file).map_err(|e| e.to_string())?;
        let (cert, _) = self.client_identity_files();
        if self.require_client_cert || self.client_cert_file.is_some() {
            check_client_certificate(cert, &self.ca_file).map_err(|e| {
                format!(
                    "{e} (peers would refuse this node; issue its certificate with extendedKeyUsage \
                     serverAuth, clientAuth from the station CA, or set client_cert_file/client_key_file)"
                )
            })?;
        }
        self.reqwest_identity().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The Raft/admin listener's server configuration: with `require_client_cert`, only clients
    /// with a certificate from `ca_file` complete the handshake.
    pub fn peer_server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        if self.require_client_cert {
            server_config_requiring_client_cert(&self.cert_file, &self.key_file, &self.ca_file)
        } else {
            server_config(&self.cert_file, &self.key_file)
        }
    }

    /// This node's client certificate and key for reqwest (presented only when a server asks).
    pub fn reqwest_identity(&self) -> Result<reqwest::Identity, TlsError> {
        let (cert, key) = self.client_identity_files();
        let read =
            |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.to_owned(), source });
        let mut pem = read(cert)?;
        pem.push(b'\n');
        pem.extend(read(key)?);
        reqwest::Identity::from_pem(&pem)
            .map_err(|e| TlsError::Pem { path: cert.to_owned(), message: e.to_string() })
    }
}
