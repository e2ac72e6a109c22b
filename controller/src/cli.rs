//! The `controller` command line: `controller run --config FILE [--bootstrap]`, one station
//! controller node. A library module so the local station (`station`) runs the same code.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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

/// Parse `args` (the first is the program name), then run the node until SIGTERM or Ctrl-C.
pub fn main<I: IntoIterator<Item = OsString>>(args: I) -> anyhow::Result<()> {
    let Command::Run { config, bootstrap } = Cli::parse_from(args).command;
    afc_process::run_service("info", async move {
        let mut cfg = crate::config::Config::load(&config)?;
        cfg.bootstrap |= bootstrap;
        cfg.validate()?;
        let listener =
            std::net::TcpListener::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
        let shutdown = afc_process::shutdown_on_signal();
        crate::service::run(cfg, listener, shutdown).await?;
        Ok(())
    })
}
