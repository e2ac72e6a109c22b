//! The server's configuration, loaded and checked once at start.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use afc_domain::bank::BankToken;
use ed25519_dalek::SigningKey;

use crate::error::ServerError;
use crate::protocol::{DEFAULT_MAX_BATCH_RECORDS, DEFAULT_MAX_BODY_BYTES};

/// Shortest bearer token accepted: a short token is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// Everything [`crate::server::run`] needs besides the listener.
#[derive(Clone)]
pub struct Config {
    /// Where station ledgers and feeds live: `{data_dir}/stations/{station}/`.
    pub data_dir: PathBuf,
    /// The bearer token every `/v1/` request must carry (compared in constant time).
    pub token: String,
    /// Optional directory of feed submissions, `{feed_dir}/{station}/*.json`, taken on read.
    pub feed_dir: Option<PathBuf>,
    /// The key that signs feed items; controllers trust its public half.
    pub feed_key: SigningKey,
    /// The id published with every item, so the feed key can rotate.
    pub feed_key_id: u32,
    /// Largest request body read, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Most records in one batch (413 above).
    pub max_batch_records: usize,
    /// HTTP worker threads.
    pub workers: usize,
    /// Bank-card charging (the `[bank]` settings).
    pub bank: BankConfig,
    /// The stored-value card issuer's master key, which verifies the PSAM TACs of svc debits
    /// (`GET /v1/admin/tac`, [`crate::tac`]); `None`: every TAC is reported `unchecked`.
    pub tac_issuer_key: Option<afc_domain::tac::IssuerKey>,
}

/// How clearing charges bank cards (see [`crate::bank`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BankConfig {
    /// At most this much is charged to one token for one business day (`None`: no cap).
    pub daily_cap_fen: Option<u32>,
    /// The acquirer simulation declines every charge to these tokens (from
    /// `--bank-declined-tokens-file`, see [`load_declined_tokens`]).
    pub declined_tokens: BTreeSet<BankToken>,
    /// How often the background charge pass runs.
    pub charge_interval: Duration,
}

/// Default time between two charge passes.
pub const DEFAULT_CHARGE_INTERVAL: Duration = Duration::from_secs(30);

impl Default for BankConfig {
    fn default() -> Self {
        BankConfig {
            daily_cap_fen: None,
            declined_tokens: BTreeSet::new(),
            charge_interval: DEFAULT_CHARGE_INTERVAL,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("token", &"<redacted>")
            .field("feed_dir", &self.feed_dir)
            .field("feed_key_id", &self.feed_key_id)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_batch_records", &self.max_batch_records)
            .field("workers", &self.workers)
            .field("bank", &self.bank)
            .field("tac_issuer_key", &self.tac_issuer_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Config {
    /// A configuration with the default limits and a fresh random feed key.
    pub fn new(data_dir: impl Into<PathBuf>, token: impl Into<String>) -> Config {
        Config {
            data_dir: data_dir.into(),
            token: token.into(),
            feed_dir: None,
            feed_key: SigningKey::generate(&mut rand::rngs::OsRng),
            feed_key_id: 1,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_batch_records: DEFAULT_MAX_BATCH_RECORDS,
            workers: 2,
            bank: BankConfig::default(),
            tac_issuer_key: None,
        }
    }

    /// Checks the values that can be wrong.
    pub fn validate(&self) -> Result<(), ServerError> {
        if self.token.len() < MIN_TOKEN_LEN {
            return Err(ServerError::Config(format!(
                "the token must be at least {MIN_TOKEN_LEN} characters"
            )));
        }
        if self.max_body_bytes < 1024 || self.max_batch_records == 0 || self.workers == 0 {
            return Err(ServerError::Config(
                "max_body_bytes >= 1024, max_batch_records >= 1 and workers >= 1 are required".into(),
            ));
        }
        if self.bank.daily_cap_fen == Some(0) || self.bank.charge_interval < Duration::from_secs(1) {
            return Err(ServerError::Config(
                "bank.daily_cap_fen >= 1 (or none) and bank.charge_interval >= 1 s are required".into(),
            ));
        }
        Ok(())
    }
}

/// Reads the tokens the acquirer simulation declines: one token (64 hex digits) per line; blank
/// lines and lines starting with `#` are ignored.
pub fn load_declined_tokens(path: &Path) -> Result<BTreeSet<BankToken>, ServerError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ServerError::Config(format!("reading the declined tokens {}: {e}", path.display())))?;
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let token = BankToken::parse(line).ok_or_else(|| {
            ServerError::Config(format!("{} line {}: a bank token is 64 hex digits", path.display(), i + 1))
        })?;
        out.insert(token);
    }
    Ok(out)
}

/// Reads a feed signing key: a file holding the 32-byte ed25519 secret as 64 hex digits.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, ServerError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ServerError::Config(format!("reading the feed key {}: {e}", path.display())))?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).map_err(|e| {
        ServerError::Config(format!("feed key {}: expected 64 hex digits: {e}", path.display()))
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads the issuer's TAC master key: a file holding 32 bytes as 64 hex digits.
pub fn load_tac_issuer_key(path: &Path) -> Result<afc_domain::tac::IssuerKey, ServerError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ServerError::Config(format!("reading the TAC issuer key {}: {e}", path.display())))?;
    afc_domain::tac::IssuerKey::from_hex(&text).map_err(|e| {
        ServerError::Config(format!("TAC issuer key {}: expected 64 hex digits: {e}", path.display()))
    })
}

/// Reads a bearer token from a file (surrounding whitespace dropped).
pub fn load_token(path: &Path) -> Result<String, ServerError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| ServerError::Config(format!("reading the token file {}: {e}", path.display())))
}
