//! `plc-sim`: a simulated gate PLC on Modbus TCP, with a line-based control socket for faults.
//!
//! `plc-sim --listen 127.0.0.1:5020 --control 127.0.0.1:5021`, then e.g.
//! `echo 'fault silence' | nc 127.0.0.1 5021` (see `PlcSim::control` for the commands).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use gate_agent::hardware::RegisterMap;
use gate_agent::plc_sim::{PlcSim, SimConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Simulated gate PLC (Modbus TCP, SPEC §6 register map)")]
struct Args {
    /// Modbus TCP listen address.
    #[arg(long, env = "PLC_SIM_LISTEN", default_value = "127.0.0.1:5020")]
    listen: SocketAddr,
    /// Control socket listen address (one command per line).
    #[arg(long, env = "PLC_SIM_CONTROL")]
    control: Option<SocketAddr>,
    /// Milliseconds from an open command to the end of the simulated passage.
    #[arg(long, env = "PLC_SIM_PASSAGE_MS", default_value_t = 800)]
    passage_ms: u64,
    /// Hardware profile (TOML register map); the SPEC default when absent.
    #[arg(long, env = "PLC_SIM_PROFILE")]
    profile: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    let map = match &args.profile {
        Some(p) => RegisterMap::load(p)?,
        None => RegisterMap::default(),
    };
    let sim = PlcSim::new(SimConfig {
        map,
        passage: Duration::from_millis(args.passage_ms),
        ..SimConfig::default()
    });
    let cancel = CancellationToken::new();
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("bind {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "plc-sim serving Modbus TCP");
    if let Some(addr) = args.control {
        let control = TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?;
        tokio::spawn(control_loop(control, sim.clone()));
    }
    let stop = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    sim.serve(listener, cancel).await?;
    Ok(())
}

async fn control_loop(listener: TcpListener, sim: PlcSim) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let sim = sim.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = match sim.control(&line) {
                    Ok(a) => a,
                    Err(e) => format!("error: {e}"),
                };
                if w.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}
