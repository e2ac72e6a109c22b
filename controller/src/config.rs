//! The node's configuration file (TOML), loaded and validated once at start.
//!
//! Every field is documented in `deploy/controller.example.toml`. The cluster secret comes from
//! `cluster_secret_file` or the `AFC_CLUSTER_SECRET` environment variable, never from the file
//! itself, so the config can be shared and checked in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use afc_domain::model::Ident;
use serde::Deserialize;

/// Environment variable that may hold the cluster secret.
pub const SECRET_ENV: &str = "AFC_CLUSTER_SECRET";
/// Shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration of one controller node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's Raft id, unique within the station's cluster.
    pub node_id: u64,
    /// The station this cluster serves (batches for another station are refused).
    pub station: Ident,
    /// Where the sled database and snapshot files live.
    pub data_dir: PathBuf,
    /// Address the Raft/admin HTTP listener binds.
    pub listen: SocketAddr,
    /// Address other nodes use to reach this one (defaults to `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Form a new cluster from `initial_members` if, and only if, the store is empty.
    #[serde(default)]
    pub bootstrap: bool,
    /// The first voters (id and advertised address), used only by bootstrap.
    #[serde(default)]
    pub initial_members: Vec<Member>,
    /// File holding the cluster secret (first line, trimmed). Overrides `AFC_CLUSTER_SECRET`.
    #[serde(default)]
    pub cluster_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub raft: RaftTuning,
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// The MQTT side (SPEC §5): absent means this node does not talk to gates.
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// The public operations HTTP API and console (`/api/v1`, `/metrics`, `/healthz`, `/readyz`).
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub clearing: ClearingConfig,
    /// TLS of the HTTP listeners and of the HTTP clients that reach other nodes; absent: plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// How staged rollouts are run and judged (SPEC §4): canary gates, soak, health limits,
    /// staged kinds; and the blacklist mass-insertion threshold is `api.blacklist_confirm_threshold`.
    /// Copied into each rollout when it starts.
    #[serde(default)]
    pub rollout: afc_domain::rollout::RolloutPolicy,
    /// Filled by [`Config::load`] from the file or environment; never read from the TOML.
    #[serde(skip)]
    pub cluster_secret: String,
}

/// A voter of the initial cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: u64,
    pub addr: String,
}

/// `[tls]`: defined beside its checks and rustls configurations.
pub use crate::tls::TlsConfig;

/// `[mqtt.tls]`: shared with the gate agent.
pub use afc_tls::MqttTls;

/// Raft timing and log compaction.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    /// Leader heartbeat interval. openraft also uses it as the timeout of one append request, so
    /// it must exceed the time a follower takes to write and fsync `max_payload_entries` entries.
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_logs: u64,
    /// Log entries kept after a snapshot, so a briefly absent follower catches up from the log.
    pub logs_kept_after_snapshot: u64,
    pub snapshot_chunk_bytes: u64,
    pub install_snapshot_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Most entries in one append request.
    pub max_payload_entries: u64,
    /// After Raft stopped on a fatal error (a storage write failed: disk full or read-only), how
    /// long the node keeps answering `/readyz` 503 and `/metrics` with the reason before it exits
    /// non-zero for its supervisor to restart it.
    pub fatal_exit_delay_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_after_logs: 20_000,
            logs_kept_after_snapshot: 5_000,
            snapshot_chunk_bytes: 4 * 1024 * 1024,
            install_snapshot_timeout_ms: 10_000,
            connect_timeout_ms: 500,
            max_payload_entries: 64,
            fatal_exit_delay_ms: 5_000,
        }
    }
}

/// Ledger housekeeping.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Records acknowledged by clearing are dropped once older than this many days.
    pub retention_days: u32,
    /// How often the leader proposes a prune.
    pub prune_interval_secs: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig { retention_days: 30, prune_interval_secs: 3600 }
    }
}

/// Environment variable that may hold the MQTT password.
pub const MQTT_PASSWORD_ENV: &str = "AFC_MQTT_PASSWORD";

/// Where the broker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerMode {
    /// This node runs rumqttd on `embedded_listen` (one-box station, tests) and connects to it.
    Embedded,
    /// Connect to a broker run elsewhere (Mosquitto in production) at `address`.
    #[default]
    External,
}

/// A gate the leader registers at start (tests, first commissioning); later changes go through Raft.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateSeed {
    pub gate: Ident,
    /// ed25519 public key, hex (32 bytes), that verifies the gate's tx batches.
    pub tx_public_key: String,
    #[serde(default = "default_profile")]
    pub hardware_profile: String,
}

fn default_profile() -> String {
    "default".into()
}

/// The MQTT side: broker, credentials, and the leader's duties' tuning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `embedded` or `external`.
    pub broker: BrokerMode,
    /// Where the embedded broker listens (port 0 is not supported by rumqttd).
    pub embedded_listen: SocketAddr,
    /// File of `user:password` lines: the only clients the embedded broker lets in (a user per
    /// gate, one for the controllers). Read once at load; `broker = "embedded"` needs it unless
    /// `embedded_allow_anonymous`. This node logs in to its own broker as `username`.
    pub embedded_users_file: Option<PathBuf>,
    /// Let any client connect to the embedded broker without credentials (tests only).
    pub embedded_allow_anonymous: bool,
    /// Filled by [`Config::load`] from `embedded_users_file`; never read from the TOML.
    #[serde(skip)]
    pub embedded_users: crate::leader::broker::BrokerUsers,
    /// `host:port` of the broker this node connects to (for `embedded`, usually `embedded_listen`).
    pub address: String,
    /// MQTT user name; `None` connects without credentials.
    pub username: Option<String>,
    /// File whose first line is the MQTT password; else `AFC_MQTT_PASSWORD`.
    pub password_file: Option<PathBuf>,
    /// Client ids are `{prefix}-{node_id}-{term}`: unique per leadership, never shared by two nodes.
    pub client_id_prefix: String,
    pub keep_alive_secs: u64,
    /// Largest MQTT packet either way: a 256 KiB chunk or a 1 MiB tx batch plus headers.
    pub max_packet_bytes: usize,
    /// Longest wait between reconnection attempts.
    pub backoff_max_ms: u64,
    /// Numeric code of this station, for the bits of the `mode` message (None: `api.station_code`
    /// if set, else the station of the last mode change).
    pub station_code: Option<u16>,
    /// A heartbeat clock further than this from ours raises the gate's drift alarm.
    pub clock_drift_alarm_ms: i64,
    /// How long `send_command` waits for `cmd/ack`; also the command's expiry.
    pub command_timeout_ms: u64,
    /// Most tx batches proposed to Raft at the same time (openraft batches them into one append).
    pub ingest_concurrency: usize,
    /// How often used QR codes are relayed to `qr/used` (ms).
    pub qr_relay_ms: u64,
    /// Gates registered by the leader at start when not yet registered with this key.
    pub gates: Vec<GateSeed>,
    /// Connect to the broker over TLS; absent: plain MQTT.
    pub tls: Option<MqttTls>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            broker: BrokerMode::External,
            embedded_listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            embedded_users_file: None,
            embedded_allow_anonymous: false,
            embedded_users: Default::default(),
            address: "127.0.0.1:1883".into(),
            username: None,
            password_file: None,
            client_id_prefix: "afc-controller".into(),
            keep_alive_secs: 5,
            max_packet_bytes: 1024 * 1024 + 64 * 1024,
            backoff_max_ms: 2000,
            station_code: None,
            clock_drift_alarm_ms: 2000,
            command_timeout_ms: 5000,
            ingest_concurrency: 32,
            qr_relay_ms: 50,
            gates: Vec::new(),
            tls: None,
        }
    }
}

/// The public operations HTTP listener: the JSON API, the console, metrics and health.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address the API listener binds; `None` serves no API (the Raft/admin listener still runs).
    pub listen: Option<SocketAddr>,
    /// The station's numeric code (SPEC §3, Dalian: line × 100 + n), the station mode changes name.
    pub station_code: u16,
    /// Bearer tokens accepted, each stored as the sha256 of the token, never the token itself.
    pub tokens: Vec<ApiToken>,
    /// File holding the station package-signing key (ed25519 seed, 64 hex characters, first line).
    /// Without it, parameter uploads answer 503 `signing_key_missing`.
    pub signing_key_file: Option<PathBuf>,
    /// Key id written into signed packages, so gates can tell rotated keys apart.
    pub signing_key_id: u32,
    /// A blacklist upload adding more card ids than this needs a second engineer's confirmation.
    pub blacklist_confirm_threshold: u64,
    /// Largest request body accepted (bytes); larger bodies get 413 `payload_too_large`.
    pub max_body_bytes: usize,
    /// Ledger scans (`/api/v1/ledger/verify`, `/api/v1/ledger/search`) running at once on this
    /// node; each reads up to the whole retained ledger.
    pub max_concurrent_scans: usize,
    /// How long a scan waits for a free slot before it answers 503 `busy` with `Retry-After`.
    pub scan_wait_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: None,
            station_code: 0,
            tokens: Vec::new(),
            signing_key_file: None,
            signing_key_id: 1,
            blacklist_confirm_threshold: 10_000,
            max_body_bytes: 16 * 1024 * 1024,
            max_concurrent_scans: 2,
            scan_wait_ms: 200,
        }
    }
}

impl MqttConfig {
    /// The password from `password_file` or `AFC_MQTT_PASSWORD` (`None` when neither is set).
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        match &self.password_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|t| Some(t.lines().next().unwrap_or("").trim().to_owned()))
                .map_err(|source| ConfigError::Read { path: p.clone(), source }),
            None => Ok(std::env::var(MQTT_PASSWORD_ENV).ok()),
        }
    }

    /// Who the embedded broker lets in: the users of `embedded_users_file`, or anyone with
    /// `embedded_allow_anonymous`.
    pub fn embedded_clients(&self) -> crate::leader::broker::Clients {
        use crate::leader::broker::Clients;
        if self.embedded_allow_anonymous {
            Clients::Anyone
        } else {
            Clients::Users(self.embedded_users.clone())
        }
    }

    /// The embedded broker's keys: users from the file (when embedded), checked against this
    /// node's own login. Called by [`Config::validate`].
    fn validate_embedded(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.broker != BrokerMode::Embedded {
            if self.embedded_users_file.is_some() || self.embedded_allow_anonymous {
                return bad(
                    "mqtt: embedded_users_file and embedded_allow_anonymous are for broker = \"embedded\" only"
                        .into(),
                );
            }
            return Ok(());
        }
        if self.embedded_allow_anonymous {
            if self.embedded_users_file.is_some() {
                return bad(
                    "mqtt: embedded_users_file and embedded_allow_anonymous exclude each other".into()
                );
            }
            return Ok(());
        }
        if self.embedded_users.is_empty() {
            return bad(
                "mqtt: broker = \"embedded\" needs embedded_users_file (user:password lines, one user per \
                 client) so the broker is not open to anyone; only tests set embedded_allow_anonymous = true"
                    .into(),
            );
        }
        // This node connects to its own broker: its login must be one of the users.
        let Some(user) = &self.username else {
            return bad(
                "mqtt: the embedded broker requires credentials; set username and password_file".into()
            );
        };
        match (self.embedded_users.password(user), self.password()?) {
            (Some(want), Some(have)) if want == have => Ok(()),
            (None, _) => bad(format!("mqtt: username {user:?} is not in embedded_users_file")),
            _ => bad(format!(
                "mqtt: the password of {user:?} (password_file or {MQTT_PASSWORD_ENV}) is not the one in embedded_users_file"
            )),
        }
    }
}

/// One API bearer token: who holds it, what it may do, and its sha256 (hex).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// The holder's name, written into the audit log as the actor.
    pub name: String,
    /// `viewer`, `operator` or `engineer`.
    pub role: String,
    /// sha256 of the token, 64 hex characters (`printf %s TOKEN | sha256sum`).
    pub sha256: String,
}

/// Environment variable that may hold the clearing bearer token.
pub const CLEARING_TOKEN_ENV: &str = "AFC_CLEARING_TOKEN";

/// Upload of the station ledger to central clearing by the leader (SPEC §8), task `clearing-sync`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClearingConfig {
    /// Base URL of the clearing server (`https://acc.example:8480`). Absent: no upload at all.
    pub url: Option<String>,
    /// File whose first line is the bearer token. Overrides `AFC_CLEARING_TOKEN`.
    pub token_file: Option<PathBuf>,
    /// Most ledger records in one upload (the reference server accepts up to 100,000).
    pub batch_records: usize,
    /// First wait after a failure; doubled after each further failure up to `backoff_max_ms`.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// How often an idle leader looks for new ledger entries.
    pub poll_ms: u64,
    /// Timeout of a whole watermark call, and of a whole upload.
    pub request_timeout_ms: u64,
    pub upload_timeout_ms: u64,
    /// The clearing feed key's public half (64 hex characters). With it (and `url`), the leader
    /// pulls the signed parameter feed (task `params-feed`), compiles network + fare rule into a
    /// fare table and starts its rollout; items not signed by this key are refused.
    pub feed_key: Option<String>,
    /// The key id feed items must name.
    pub feed_key_id: u32,
    /// How often the leader asks for new feed items.
    pub feed_poll_ms: u64,
    /// The clearing lag alarm (`GET /api/v1/clearing` `lag_alarm`, `afc_clearing_lag_alarm`, the
    /// console's banner) is raised once ledger records have waited this many seconds with no
    /// upload acknowledged and clearing not caught up (see [`crate::clearing_lag`]). 1 or more.
    pub lag_alarm_secs: u64,
}

impl Default for ClearingConfig {
    fn default() -> Self {
        ClearingConfig {
            url: None,
            token_file: None,
            batch_records: 5_000,
            backoff_min_ms: 200,
            backoff_max_ms: 30_000,
            poll_ms: 200,
            request_timeout_ms: 15_000,
            upload_timeout_ms: 120_000,
            feed_key: None,
            feed_key_id: 1,
            feed_poll_ms: 1_000,
            lag_alarm_secs: 900,
        }
    }
}

impl ClearingConfig {
    /// The bearer token, from `token_file` or `AFC_CLEARING_TOKEN`.
    pub fn token(&self) -> Result<String, ConfigError> {
        let token = match &self.token_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|source| ConfigError::Read { path: p.clone(), source })?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned(),
            None => std::env::var(CLEARING_TOKEN_ENV).unwrap_or_default(),
        };
        if token.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "clearing.url is set but no token: set clearing.token_file or {CLEARING_TOKEN_ENV}"
            )));
        }
        Ok(token)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_records == 0 || self.batch_records > 100_000 {
            return Err(ConfigError::Invalid("clearing.batch_records must be 1..=100000".into()));
        }
        if self.backoff_min_ms == 0 || self.backoff_max_ms < self.backoff_min_ms || self.poll_ms == 0 {
            return Err(ConfigError::Invalid(
                "clearing: backoff_min_ms and poll_ms must be > 0, backoff_max_ms >= backoff_min_ms".into(),
            ));
        }
        if self.lag_alarm_secs == 0 {
            return Err(ConfigError::Invalid("clearing.lag_alarm_secs must be > 0".into()));
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses, resolves the secret and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut cfg: Config =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        cfg.cluster_secret = match &cfg.cluster_secret_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|source| ConfigError::Read { path: p.clone(), source })?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned(),
            None => std::env::var(SECRET_ENV).unwrap_or_default(),
        };
        if let Some(m) = cfg.mqtt.as_mut().filter(|m| m.broker == BrokerMode::Embedded) {
            if let Some(p) = &m.embedded_users_file {
                m.embedded_users = crate::leader::broker::BrokerUsers::read(p)
                    .map_err(|e| ConfigError::Invalid(format!("mqtt.embedded_users_file: {e}")))?;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.cluster_secret.len() < MIN_SECRET_LEN {
            return bad(format!(
                "the cluster secret (cluster_secret_file or {SECRET_ENV}) must have at least {MIN_SECRET_LEN} characters"
            ));
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            return bad("raft.election_timeout_min_ms must exceed twice raft.heartbeat_ms".into());
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad("raft.election_timeout_max_ms must exceed raft.election_timeout_min_ms".into());
        }
        self.clearing.validate()?;
        let r = &self.rollout;
        if r.soak_ms < 0 || r.ack_deadline_ms <= 0 {
            return bad("rollout: soak_ms must be >= 0 and ack_deadline_ms > 0".into());
        }
        if r.canary_gates.is_empty() && r.canary_count == 0 {
            return bad("rollout: name canary_gates or set canary_count >= 1".into());
        }
        if r.max_canary_reject_ppm > afc_domain::rollout::PPM
            || r.max_reject_excess_ppm > afc_domain::rollout::PPM
        {
            return bad("rollout: reject limits are parts per million (at most 1000000)".into());
        }
        if let Some(k) = &self.clearing.feed_key {
            let ok = hex::decode(k.trim()).is_ok_and(|b| b.len() == 32);
            if !ok || self.api.signing_key_file.is_none() {
                return bad(
                    "clearing.feed_key must be 64 hex characters, and needs api.signing_key_file".into()
                );
            }
        }
        for t in &self.api.tokens {
            if !matches!(t.role.as_str(), "viewer" | "operator" | "engineer") {
                return bad(format!(
                    "api.tokens: role {:?} of {:?} is not viewer, operator or engineer",
                    t.role, t.name
                ));
            }
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                return bad(format!("api.tokens: sha256 of {:?} must be 64 hex characters", t.name));
            }
        }
        if let Some(t) = &self.tls {
            t.check().map_err(|e| ConfigError::Invalid(format!("tls: {e}")))?;
        }
        if let Some((m, t)) = self.mqtt.as_ref().and_then(|m| m.tls.as_ref().map(|t| (m, t))) {
            if m.broker == BrokerMode::Embedded {
                return bad(
                    "mqtt.tls: the embedded broker speaks plain MQTT only; use broker = \"external\" \
                            (Mosquitto with a TLS listener) or drop [mqtt.tls]"
                        .into(),
                );
            }
            if t.client_cert_file.is_some() != t.client_key_file.is_some() {
                return bad("mqtt.tls: client_cert_file and client_key_file go together".into());
            }
            t.client_config().map_err(|e| ConfigError::Invalid(format!("mqtt.tls: {e}")))?;
        }
        if let Some(m) = &self.mqtt {
            m.validate_embedded()?;
        }
        if self.mqtt.is_some() && self.api.signing_key_file.is_none() {
            return bad(
                "[mqtt] needs api.signing_key_file: the leader signs mode, commands, tx acks and the \
                 QR relay with the station key, and gates take them only signed"
                    .into(),
            );
        }
        if self.api.max_concurrent_scans == 0 || self.api.max_concurrent_scans > 1024 {
            return bad("api.max_concurrent_scans must be 1..=1024".into());
        }
        if self.bootstrap && !self.initial_members.iter().any(|m| m.id == self.node_id) {
            return bad("bootstrap needs initial_members to include this node_id".into());
        }
        Ok(())
    }

    /// `https` when peers talk TLS (`tls.peers`), else `http`: the scheme of every request to
    /// another node's Raft/admin listener.
    pub fn peer_scheme(&self) -> &'static str {
        if self.tls.as_ref().is_some_and(|t| t.peers) {
            "https"
        } else {
            "http"
        }
    }

    /// A reqwest client builder for requests to other nodes: with `tls`, it trusts only the
    /// configured CA bundle (a server whose certificate is not from it gets no request at all) and
    /// presents this node's client certificate.
    pub fn peer_client(&self) -> Result<reqwest::ClientBuilder, ConfigError> {
        let mut b = reqwest::Client::builder().connect_timeout(self.connect_timeout());
        if let Some(t) = &self.tls {
            b = b.tls_built_in_root_certs(false);
            for c in crate::tls::reqwest_roots(&t.ca_file)
                .map_err(|e| ConfigError::Invalid(format!("tls: {e}")))?
            {
                b = b.add_root_certificate(c);
            }
            // Presented only to a server that asks for it (`require_client_cert` there).
            b = b.identity(t.reqwest_identity().map_err(|e| ConfigError::Invalid(format!("tls: {e}")))?);
        }
        Ok(b)
    }

    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    /// openraft's configuration from ours.
    pub fn openraft(&self) -> Result<openraft::Config, ConfigError> {
        let r = &self.raft;
        let c = openraft::Config {
            cluster_name: format!("afc-{}", self.station),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            install_snapshot_timeout: r.install_snapshot_timeout_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_after_logs),
            max_in_snapshot_log_to_keep: r.logs_kept_after_snapshot,
            snapshot_max_chunk_size: r.snapshot_chunk_bytes,
            max_payload_entries: r.max_payload_entries,
            ..Default::default()
        };
        c.validate().map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.raft.connect_timeout_ms)
    }
}
