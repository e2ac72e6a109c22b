//! The gate agent binary. The agent itself (reader interface, Modbus, MQTT, outbox) is issue 4;
//! until it lands this binary only says so, rather than pretending to run a gate.

use clap::Parser;

/// Gate agent of the station controller cluster.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> std::process::ExitCode {
    let _ = Cli::parse();
    eprintln!(
        "gate-agent: not built yet; the shared decision engine lives in afc-domain (see ARCHITECTURE.md)"
    );
    std::process::ExitCode::from(2)
}
