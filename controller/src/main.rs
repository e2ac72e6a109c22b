//! `controller run --config FILE [--bootstrap]`: one station controller node.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Station controller node: replicated station ledger and parameter store")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Run {
        /// The TOML configuration file (see deploy/controller.example.toml).
        #[arg(long, env = "AFC_CONTROLLER_CONFIG")]
        config: PathBuf,
        /// Form a new cluster from `initial_members` (only acts on an empty store).
        #[arg(long, env = "AFC_BOOTSTRAP")]
        bootstrap: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    // A panic anywhere leaves a half-alive node: abort instead, and let the supervisor restart it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let Command::Run { config, bootstrap } = Cli::parse().command;
    let mut cfg = controller::config::Config::load(&config)?;
    cfg.bootstrap |= bootstrap;
    cfg.validate()?;
    let listener =
        std::net::TcpListener::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        controller::service::wait_for_signal().await;
        tracing::info!("termination signal received");
        signal.cancel();
    });
    controller::service::run(cfg, listener, shutdown).await?;
    Ok(())
}
