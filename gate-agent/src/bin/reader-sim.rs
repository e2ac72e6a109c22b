//! `reader-sim`: a simulated card reader that taps a running gate agent and reports the outcome.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use afc_domain::model::StationCode;
use afc_domain::wire::ReaderReply;
use clap::Parser;
use ed25519_dalek::SigningKey;
use gate_agent::gate::now;
use gate_agent::reader_sim::{QrIssuer, ReaderConn, ReaderSim};

#[derive(Parser)]
#[command(about = "Simulated card reader: realistic taps against a gate agent's reader port")]
struct Args {
    /// The gate agent's reader address.
    #[arg(long, env = "READER_SIM_ADDR", default_value = "127.0.0.1:7700")]
    addr: SocketAddr,
    /// This station's code.
    #[arg(long, env = "READER_SIM_STATION", default_value_t = 101)]
    station: u16,
    /// Station codes passengers come from (comma-separated).
    #[arg(long, env = "READER_SIM_ORIGINS", value_delimiter = ',', default_value = "102,103,104")]
    origins: Vec<u16>,
    /// Number of taps.
    #[arg(long, env = "READER_SIM_TAPS", default_value_t = 100)]
    taps: u64,
    /// Taps per second (0: as fast as the gate answers).
    #[arg(long, env = "READER_SIM_RATE", default_value_t = 2.0)]
    rate: f64,
    /// Hex seed of a QR issuer key the gate trusts (issuer 1, key 1); no QR codes without it.
    #[arg(long, env = "READER_SIM_QR_KEY")]
    qr_key: Option<String>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let qr = match &args.qr_key {
        Some(h) => {
            let seed: [u8; 32] = hex::decode(h.trim())?
                .try_into()
                .map_err(|_| anyhow::anyhow!("QR key must be 32 bytes of hex"))?;
            Some(QrIssuer { issuer: 1, key_id: 1, key: SigningKey::from_bytes(&seed) })
        }
        None => None,
    };
    let origins = args.origins.iter().map(|c| StationCode(*c)).collect();
    let mut sim = ReaderSim::new(args.seed, StationCode(args.station), origins, 10_000, qr);
    let mut conn = ReaderConn::connect(args.addr).await?;
    let mut latencies = Vec::with_capacity(args.taps as usize);
    let mut reasons = std::collections::BTreeMap::<String, u64>::new();
    for _ in 0..args.taps {
        let (presented, tap) = sim.next_tap(now());
        let t = Instant::now();
        let reply = conn.tap(&tap).await?;
        latencies.push(t.elapsed());
        match reply {
            ReaderReply::Response(r) => {
                *reasons.entry(format!("{:?}/{}", r.decision, r.reason)).or_default() += 1;
                sim.apply(presented, &r);
            }
            ReaderReply::Error(e) => *reasons.entry(format!("error/{}", e.error)).or_default() += 1,
        }
        if args.rate > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(1.0 / args.rate)).await;
        }
    }
    latencies.sort();
    let pct =
        |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default();
    println!("taps: {}  p50 {:?}  p99 {:?}  max {:?}", latencies.len(), pct(0.5), pct(0.99), pct(1.0));
    for (k, v) in reasons {
        println!("  {k}: {v}");
    }
    Ok(())
}
