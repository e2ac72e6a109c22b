//! Secrets, resolved once when the node starts ([`Secrets::load`], called by
//! [`crate::node::Node::start`] right after the configuration is loaded): the station
//! package-signing key, the MQTT password, the `[mqtt.tls]` client configuration and the clearing
//! token. A missing or unreadable file stops start-up with the file's name; every reader (the API,
//! the leader's MQTT duties, the rollout driver, the clearing upload and feed) takes the value held
//! here, so no leadership, task or request reads a secret file again. The cluster secret is
//! resolved by [`Config::load`] itself (the Raft network needs it before the node exists).

use std::path::Path;
use std::sync::Arc;

use afc_domain::model::{ParamKind, Timestamp};
use afc_domain::package::Package;
use afc_domain::signed;
use afc_domain::wire::WireMessage;
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::config::{Config, ConfigError};

/// The station key (`api.signing_key_file`, `api.signing_key_id`): it signs packages and seals
/// everything the leader publishes to gates; gates verify it with their trusted keys.
pub struct StationKey {
    pub key_id: u32,
    key: SigningKey,
}

impl std::fmt::Debug for StationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StationKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl StationKey {
    pub fn new(key_id: u32, key: SigningKey) -> StationKey {
        StationKey { key_id, key }
    }

    /// Reads the key file: an ed25519 seed, 64 hex characters on the first line.
    pub fn read(key_id: u32, path: &Path) -> Result<StationKey, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let seed: [u8; 32] = hex::decode(text.lines().next().unwrap_or("").trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| ConfigError::Invalid(format!("{}: expected 64 hex characters", path.display())))?;
        Ok(StationKey { key_id, key: SigningKey::from_bytes(&seed) })
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// `body` signed as `version` of `kind`, in force from `effective_from`.
    pub fn sign_package(
        &self,
        kind: ParamKind,
        version: u64,
        effective_from: Timestamp,
        body: Vec<u8>,
    ) -> Package {
        Package::sign(kind, version, effective_from, body, self.key_id, &self.key)
    }

    /// The payload to publish `msg` on `topic` with.
    pub fn seal<T: WireMessage>(&self, topic: &str, msg: &T) -> Vec<u8> {
        signed::seal(topic, msg, self.key_id, &self.key)
    }
}

/// Every secret the node's tasks use, read once.
#[derive(Default)]
pub struct Secrets {
    /// `api.signing_key_file`, if set (`[mqtt]` and `clearing.feed_key` require it).
    pub station_key: Option<Arc<StationKey>>,
    /// `mqtt.password_file` or `AFC_MQTT_PASSWORD`; `None` without `[mqtt]` or without either.
    pub mqtt_password: Option<String>,
    /// `[mqtt.tls]` as a rustls client configuration (the CA bundle and client identity, read once).
    pub mqtt_tls: Option<Arc<rustls::ClientConfig>>,
    /// `clearing.token_file` or `AFC_CLEARING_TOKEN`; `None` without `clearing.url`.
    pub clearing_token: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("station_key", &self.station_key)
            .field("mqtt_password", &self.mqtt_password.as_ref().map(|_| "<set>"))
            .field("mqtt_tls", &self.mqtt_tls.is_some())
            .field("clearing_token", &self.clearing_token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Secrets {
    /// Reads every secret `config` names; fails on the first file that is missing or unreadable.
    pub fn load(config: &Config) -> Result<Secrets, ConfigError> {
        let api = &config.api;
        let station_key = match &api.signing_key_file {
            Some(p) => Some(Arc::new(StationKey::read(api.signing_key_id, p)?)),
            None => None,
        };
        let (mqtt_password, mqtt_tls) = match &config.mqtt {
            Some(m) => (
                m.password()?,
                m.tls
                    .as_ref()
                    .map(|t| t.client_config())
                    .transpose()
                    .map_err(|e| ConfigError::Invalid(format!("mqtt.tls: {e}")))?
                    .map(Arc::new),
            ),
            None => (None, None),
        };
        let clearing_token = match &config.clearing.url {
            Some(_) => Some(config.clearing.token()?),
            None => None,
        };
        Ok(Secrets { station_key, mqtt_password, mqtt_tls, clearing_token })
    }

    /// The clearing token (for the tasks that run only with `clearing.url`).
    pub fn clearing_token(&self) -> Result<String, ConfigError> {
        self.clearing_token.clone().ok_or_else(|| {
            ConfigError::Invalid("no clearing token: clearing.url was not set when the node started".into())
        })
    }

    /// The station key, or why the task that needs it cannot run (`needs`, the error's text).
    pub fn require_station_key(&self, needs: &str) -> Result<Arc<StationKey>, ConfigError> {
        self.station_key.clone().ok_or_else(|| ConfigError::Invalid(needs.to_owned()))
    }
}
