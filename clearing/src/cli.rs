//! The `clearing-server` command line: the reference central clearing server (SPEC §8). A library
//! module so the local station (`station`) runs the same code.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::{load_declined_tokens, load_signing_key, load_tac_issuer_key, load_token, Config};
use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Reference central clearing server: ledger batch upload, watermark, signed parameter feed"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "AFC_CLEARING_LISTEN", default_value = "127.0.0.1:8480")]
    listen: SocketAddr,
    /// Where station ledgers and feeds are stored.
    #[arg(long, env = "AFC_CLEARING_DATA_DIR")]
    data_dir: PathBuf,
    /// File holding the bearer token stations present.
    #[arg(long, env = "AFC_CLEARING_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The bearer token itself (prefer --token-file; the environment is safer than the command line).
    #[arg(long, env = "AFC_CLEARING_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Directory of feed submissions, `{feed_dir}/{station}/*.json`.
    #[arg(long, env = "AFC_CLEARING_FEED_DIR")]
    feed_dir: Option<PathBuf>,
    /// File holding the feed signing key (64 hex digits, e.g. `openssl rand -hex 32`); without it a
    /// random key is used for this run only.
    #[arg(long, env = "AFC_CLEARING_FEED_KEY_FILE")]
    feed_key_file: Option<PathBuf>,
    /// Key id published with every feed item.
    #[arg(long, env = "AFC_CLEARING_FEED_KEY_ID", default_value_t = 1)]
    feed_key_id: u32,
    /// Largest request body in bytes.
    #[arg(long, env = "AFC_CLEARING_MAX_BODY_BYTES", default_value_t = crate::protocol::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Most records in one batch.
    #[arg(long, env = "AFC_CLEARING_MAX_BATCH_RECORDS", default_value_t = crate::protocol::DEFAULT_MAX_BATCH_RECORDS)]
    max_batch_records: usize,
    /// HTTP worker threads.
    #[arg(long, env = "AFC_CLEARING_WORKERS", default_value_t = 2)]
    workers: usize,
    /// [bank] Most fen charged to one bank token for one business day (default: no cap).
    #[arg(long, env = "AFC_CLEARING_BANK_DAILY_CAP_FEN")]
    bank_daily_cap_fen: Option<u32>,
    /// [bank] File of the tokens the acquirer simulation declines, one per line (64 hex digits;
    /// `#` comments).
    #[arg(long, env = "AFC_CLEARING_BANK_DECLINED_TOKENS_FILE")]
    bank_declined_tokens_file: Option<PathBuf>,
    /// [bank] Seconds between two background charge passes.
    #[arg(long, env = "AFC_CLEARING_BANK_CHARGE_INTERVAL_SECS", default_value_t = 30)]
    bank_charge_interval_secs: u64,
    /// File holding the stored-value issuer's TAC master key (64 hex digits), which verifies the
    /// PSAM TAC of every svc debit (`GET /v1/admin/tac`); without it TACs are reported unchecked.
    #[arg(long, env = "AFC_CLEARING_TAC_ISSUER_KEY_FILE")]
    tac_issuer_key_file: Option<PathBuf>,
}

/// Parse `args` (the first is the program name), then serve until SIGTERM or Ctrl-C.
pub fn main<I: IntoIterator<Item = OsString>>(args: I) -> anyhow::Result<()> {
    let cli = Cli::parse_from(args);
    afc_process::run_service("info", serve(cli))
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let token = match (&cli.token_file, cli.token) {
        (Some(path), _) => load_token(path)?,
        (None, Some(token)) => token,
        (None, None) => anyhow::bail!("give --token-file or --token (AFC_CLEARING_TOKEN)"),
    };
    let mut config = Config::new(&cli.data_dir, token);
    match &cli.feed_key_file {
        Some(path) => config.feed_key = load_signing_key(path)?,
        None => tracing::warn!(
            public_key = %hex::encode(config.feed_key.verifying_key().to_bytes()),
            "no --feed-key-file: feed items are signed with a key made up for this run"
        ),
    }
    config.feed_dir = cli.feed_dir;
    config.feed_key_id = cli.feed_key_id;
    config.max_body_bytes = cli.max_body_bytes;
    config.max_batch_records = cli.max_batch_records;
    config.workers = cli.workers;
    config.bank.daily_cap_fen = cli.bank_daily_cap_fen;
    if let Some(path) = &cli.bank_declined_tokens_file {
        config.bank.declined_tokens = load_declined_tokens(path)?;
    }
    config.bank.charge_interval = std::time::Duration::from_secs(cli.bank_charge_interval_secs);
    match &cli.tac_issuer_key_file {
        Some(path) => config.tac_issuer_key = Some(load_tac_issuer_key(path)?),
        None => tracing::warn!("no --tac-issuer-key-file: stored-value TACs are reported unchecked"),
    }
    config.validate()?;
    let listener =
        std::net::TcpListener::bind(cli.listen).with_context(|| format!("binding {}", cli.listen))?;
    let shutdown = afc_process::shutdown_on_signal();
    crate::run(listener, config, shutdown).await?;
    Ok(())
}
