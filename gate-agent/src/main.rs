//! `gate-agent`: parse flags, load the configuration, bind the listeners, run until a signal.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use gate_agent::config::Config;
use gate_agent::Listeners;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "AFC gate agent: decides taps, drives the gate PLC, talks to the station over MQTT")]
struct Args {
    /// Configuration file (see deploy/gate-agent.example.toml).
    #[arg(long, short, env = "GATE_AGENT_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // A panic in any task must not leave a half-alive gate: log it and abort.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    let reader = TcpListener::bind(config.reader_listen)
        .await
        .with_context(|| format!("bind reader {}", config.reader_listen))?;
    let metrics = match config.metrics_listen {
        Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("bind metrics {a}"))?),
        None => None,
    };
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received");
        stop.cancel();
    });
    gate_agent::run(&config, Listeners { reader, metrics }, cancel).await?;
    Ok(())
}
