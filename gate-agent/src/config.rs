//! The gate agent's configuration: one TOML file, read and validated once at start-up.
//!
//! Every field is documented in `deploy/gate-agent.example.toml`. Secrets (the MQTT password, the
//! gate's transaction-signing key) are read from files named here, never written in the TOML.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use afc_domain::model::{Ident, StationCode};
use afc_domain::package::TrustedKeys;
use afc_domain::wire::GateDirection;
use ed25519_dalek::SigningKey;
use serde::Deserialize;
use thiserror::Error;

use crate::hardware::RegisterMap;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid configuration {path}: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(transparent)]
    Profile(#[from] crate::hardware::ProfileError),
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The station id used in MQTT topics (`afc/v1/{station}/...`).
    pub station: Ident,
    /// This gate's id (`gates/{gate}/...`); also the ledger's `gate`.
    pub gate: Ident,
    /// The station's numeric code in the fare table: entries are recorded here, exits priced here.
    pub station_code: StationCode,
    /// Where the outbox and the parameter packages live (created if missing).
    pub data_dir: PathBuf,
    /// Where the card reader connects (local TCP, JSON lines).
    #[serde(default = "default_reader_listen")]
    pub reader_listen: SocketAddr,
    /// Longest wait for the reader's PSAM to sign a stored-value debit (two-phase readers only);
    /// past it the tap is refused with `psam_timeout`, nothing charged.
    #[serde(default = "default_psam_timeout")]
    pub psam_timeout_ms: u64,
    /// `/metrics` and `/healthz`; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The hex ed25519 seed (32 bytes) the gate signs its transaction batches with.
    pub signing_key_file: PathBuf,
    /// Station package-signing keys the gate trusts: key id (decimal) → hex public key.
    #[serde(default)]
    pub trusted_keys: BTreeMap<String, String>,
    /// The aisle direction until a gate_config package or a command says otherwise.
    #[serde(default = "default_direction")]
    pub direction: GateDirection,
    pub mqtt: MqttConfig,
    pub plc: PlcSection,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub qr: QrConfig,
}

fn default_reader_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7700))
}

fn default_psam_timeout() -> u64 {
    300
}

fn default_direction() -> GateDirection {
    GateDirection::Bidirectional
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker addresses `host:port`, tried in turn when one fails.
    pub brokers: Vec<String>,
    /// MQTT client id; the gate id when absent. Stable, so the broker keeps the session.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the MQTT password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "five")]
    pub keep_alive_secs: u64,
    #[serde(default = "five")]
    pub heartbeat_secs: u64,
    /// Most records per `gates/{gate}/tx` batch.
    #[serde(default = "default_batch")]
    pub batch_records: usize,
    /// How long to wait for a `tx/ack` before sending the batch again.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
    /// Longest wait between reconnect attempts.
    #[serde(default = "default_backoff_max")]
    pub reconnect_backoff_max_ms: u64,
    /// How long a package download may take before it is refused as incomplete.
    #[serde(default = "default_chunk_timeout")]
    pub package_timeout_ms: u64,
    /// Connect to every broker over TLS; absent: plain MQTT.
    #[serde(default)]
    pub tls: Option<MqttTls>,
}

/// `[mqtt.tls]`: shared with the controller.
pub use afc_tls::MqttTls;

fn five() -> u64 {
    5
}
fn default_batch() -> usize {
    500
}
fn default_ack_timeout() -> u64 {
    5_000
}
fn default_backoff_max() -> u64 {
    5_000
}
fn default_chunk_timeout() -> u64 {
    60_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlcSection {
    /// The gate PLC's Modbus TCP address.
    pub address: SocketAddr,
    /// A hardware profile file (TOML register map); the SPEC §6 default when absent.
    #[serde(default)]
    pub profile_file: Option<PathBuf>,
    #[serde(default = "default_call_timeout")]
    pub call_timeout_ms: u64,
    #[serde(default = "default_poll")]
    pub poll_interval_ms: u64,
}

fn default_call_timeout() -> u64 {
    250
}
fn default_poll() -> u64 {
    100
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Capacity in bytes; past it, taps are refused with `outbox_full`.
    #[serde(default = "default_outbox_bytes")]
    pub max_bytes: u64,
    /// The near-full alarm fires above this percentage.
    #[serde(default = "default_near_full")]
    pub near_full_percent: u64,
    /// Size of one outbox log segment (preallocated whole, so a full disk is met when a new
    /// segment is needed, not in the middle of one). 64 KiB ..= 64 MiB.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
}

fn default_segment_bytes() -> u64 {
    crate::store::DEFAULT_SEGMENT_BYTES
}

fn default_outbox_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_near_full() -> u64 {
    80
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_bytes: default_outbox_bytes(),
            near_full_percent: default_near_full(),
            segment_bytes: default_segment_bytes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QrConfig {
    /// Tolerated clock difference between QR issuers and the gate.
    #[serde(default = "default_skew")]
    pub skew_ms: u32,
    /// Codes remembered for the replay check, all sources together.
    #[serde(default = "default_replay")]
    pub replay_capacity: usize,
    /// Sources the replay cache keeps apart: this gate and each gate whose used codes the station
    /// relays. Each gets `replay_capacity / replay_sources` entries, and a source that floods the
    /// relay evicts only its own. At least the station's number of gates.
    #[serde(default = "default_replay_sources")]
    pub replay_sources: usize,
}

fn default_skew() -> u32 {
    30_000
}
fn default_replay() -> usize {
    100_000
}
fn default_replay_sources() -> usize {
    64
}

impl Default for QrConfig {
    fn default() -> Self {
        QrConfig {
            skew_ms: default_skew(),
            replay_capacity: default_replay(),
            replay_sources: default_replay_sources(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let c: Config = toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.display().to_string(), source })?;
        c.validate()?;
        Ok(c)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let c: Config =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: "<string>".into(), source })?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.mqtt.brokers.is_empty() {
            return Err(ConfigError::Invalid("mqtt.brokers is empty".into()));
        }
        for b in &self.mqtt.brokers {
            split_host_port(b)?;
        }
        if let Some(t) = &self.mqtt.tls {
            if t.client_cert_file.is_some() != t.client_key_file.is_some() {
                return Err(ConfigError::Invalid(
                    "mqtt.tls: client_cert_file and client_key_file go together".into(),
                ));
            }
        }
        if self.outbox.near_full_percent == 0 || self.outbox.near_full_percent > 100 {
            return Err(ConfigError::Invalid("outbox.near_full_percent must be 1..=100".into()));
        }
        if !(64 * 1024..=64 * 1024 * 1024).contains(&self.outbox.segment_bytes) {
            return Err(ConfigError::Invalid("outbox.segment_bytes must be 64 KiB ..= 64 MiB".into()));
        }
        self.trusted_keys()?;
        Ok(())
    }

    pub fn trusted_keys(&self) -> Result<TrustedKeys, ConfigError> {
        let mut pairs = Vec::with_capacity(self.trusted_keys.len());
        for (id, key) in &self.trusted_keys {
            let id: u32 = id
                .parse()
                .map_err(|_| ConfigError::Invalid(format!("trusted key id {id:?} is not a number")))?;
            pairs.push((id, key.as_str()));
        }
        TrustedKeys::from_hex_pairs(pairs).map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// Reads the gate's batch-signing key.
    pub fn signing_key(&self) -> Result<SigningKey, ConfigError> {
        let text = std::fs::read_to_string(&self.signing_key_file).map_err(|source| ConfigError::Read {
            path: self.signing_key_file.display().to_string(),
            source,
        })?;
        let bytes =
            hex::decode(text.trim()).map_err(|_| ConfigError::Invalid("signing key is not hex".into()))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| ConfigError::Invalid("signing key must be 32 bytes of hex".into()))?;
        Ok(SigningKey::from_bytes(&seed))
    }

    pub fn mqtt_password(&self) -> Result<Option<String>, ConfigError> {
        match &self.mqtt.password_file {
            None => Ok(None),
            Some(p) => std::fs::read_to_string(p)
                .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|source| ConfigError::Read { path: p.display().to_string(), source }),
        }
    }

    /// The MQTT TLS client configuration (`None` without `[mqtt.tls]`); reads and checks the files.
    pub fn mqtt_tls(&self) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, ConfigError> {
        let Some(t) = &self.mqtt.tls else { return Ok(None) };
        t.client_config()
            .map(|c| Some(std::sync::Arc::new(c)))
            .map_err(|e| ConfigError::Invalid(format!("mqtt.tls: {e}")))
    }

    pub fn register_map(&self) -> Result<RegisterMap, ConfigError> {
        Ok(match &self.plc.profile_file {
            Some(p) => RegisterMap::load(p)?,
            None => RegisterMap::default(),
        })
    }

    pub fn plc_config(&self) -> Result<crate::plc::PlcConfig, ConfigError> {
        let mut c = crate::plc::PlcConfig::new(self.plc.address);
        c.map = self.register_map()?;
        c.call_timeout = Duration::from_millis(self.plc.call_timeout_ms);
        c.poll_interval = Duration::from_millis(self.plc.poll_interval_ms);
        Ok(c)
    }
}

/// Splits `host:port`.
pub fn split_host_port(s: &str) -> Result<(String, u16), ConfigError> {
    let (host, port) =
        s.rsplit_once(':').ok_or_else(|| ConfigError::Invalid(format!("broker {s:?} is not host:port")))?;
    let port = port.parse().map_err(|_| ConfigError::Invalid(format!("broker {s:?} has a bad port")))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_parses_and_validates() {
        let text = include_str!("../../deploy/gate-agent.example.toml");
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.gate.as_str(), "g01");
        assert_eq!(c.trusted_keys().unwrap().len(), 1);
        assert_eq!(split_host_port(&c.mqtt.brokers[0]).unwrap().1, 1883);
    }

    #[test]
    fn unknown_fields_and_bad_keys_are_refused() {
        let text = include_str!("../../deploy/gate-agent.example.toml");
        assert!(Config::from_toml(&format!("colour = \"red\"\n{text}")).is_err());
        let bad = text.replace("[trusted_keys]\n1 = \"", "[trusted_keys]\n1 = \"zz");
        assert!(Config::from_toml(&bad).is_err());
    }
}
